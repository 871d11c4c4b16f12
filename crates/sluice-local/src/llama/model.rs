//! The Llama transformer over GGUF weights, with per-sequence KV caches and a
//! batched forward pass for continuous batching.
//!
//! One forward pass runs any number of sequences (a [`Batch`]), each appending
//! one or more tokens to its own [`KvCache`]. All rows of the batch go through
//! the projections and the MLP together as one `[rows, hidden]` matrix, so each
//! weight is read once per step however many sequences there are; rotary
//! embeddings use each row's own position, and each row attends to its own
//! sequence's cache (grouped-query attention without repeating K/V heads).
//!
//! The forward pass is written by hand over the buffers of a [`Workspace`],
//! with the kernels of [`super::kernels`] (f32 matmul, norms, RoPE, attention)
//! and [`super::q8`] (8-bit matmul): with [`WeightFormat::F32`] or
//! [`WeightFormat::Q8_0`] weights, a decode step allocates nothing once the
//! workspace and caches have grown (`tests/alloc.rs` checks it). Weights kept
//! in the file's quantization ([`WeightFormat::AsStored`]) are multiplied by
//! candle, through tensors that are allocated on each call.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use super::error::LocalError;
use super::gguf::{Metadata, file_type_name};
use super::kernels;
use super::q8::{Q8Matrix, Q8Scratch};
use super::template::{ChatTemplate, TemplateMessage};
use super::tokenizer::GgufTokenizer;

/// Architectures whose GGUF tensors and hyperparameters follow the Llama
/// layout this implementation runs.
const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral"];

/// KV caches grow by at least this many positions at a time.
const CACHE_CHUNK: usize = 256;

/// Prompts are run through the model in pieces of at most this many tokens,
/// which bounds the workspace (`chunk × widest activation`).
const PREFILL_CHUNK: usize = 512;

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// `general.name`, or the file name without extension.
    pub name: String,
    /// `general.architecture` (e.g. `llama`).
    pub architecture: String,
    /// The quantization, e.g. `Q4_1` or `Q4_K_M` (from `general.file_type`,
    /// else the most common type among the weight matrices).
    pub quantization: String,
    /// The longest sequence the model accepts, in tokens.
    pub context_length: usize,
    /// Number of vocabulary entries (rows of the output layer).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the hidden state.
    pub embedding_length: usize,
    /// Total number of weights in the file.
    pub parameters: u64,
}

/// Hyperparameters the forward pass needs.
#[derive(Debug, Clone)]
struct Config {
    n_layer: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    eps: f32,
    /// `1 / base^(2i/d)` for each rotated pair, already divided by any
    /// per-frequency factors (`rope_freqs.weight`).
    rope_inv_freq: Vec<f32>,
    /// Position multiplier for linear RoPE scaling (`1 / factor`).
    rope_pos_scale: f32,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Query, key and value projections.
    qkv: Projections,
    wo: Weight,
    ffn_norm: Vec<f32>,
    /// Gate and up projections of the MLP.
    gate_up: Projections,
    w_down: Weight,
}

/// How a model's weight matrices are held in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As the file stores them, multiplied with candle's quantized kernels. The forward pass
    /// copies activations into and out of candle tensors for every matmul (and looks up token
    /// embeddings with candle), so a decode step allocates inside candle.
    #[default]
    AsStored,
    /// Expanded to f32 at load: 4 bytes per weight; multiplied with Sluice's batched f32 kernel
    /// ([`super::kernels`]), whose cost per row falls as the batch grows — which is what makes
    /// continuous batching pay. A decode step allocates nothing.
    F32,
    /// Re-quantized to Q8_0 at load (about 1.06 bytes per weight) and multiplied with Sluice's
    /// batched 8-bit kernel ([`super::q8`]): for files whose own quantization (Q4_1, Q5_x) has only
    /// slow CPU kernels. Matrices whose rows are not a multiple of 32 are expanded to f32. A decode
    /// step allocates nothing.
    Q8_0,
}

/// How to load a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The in-memory weight format (see [`WeightFormat`]).
    pub weights: WeightFormat,
}

/// Several projections of the same input, whose outputs sit side by side in one `[n, Σ widths]`
/// buffer. Their weights are stacked into one matrix at load time whenever they can be (always
/// for f32 and Q8_0; for candle's formats when they share a type), so one matmul computes them
/// all.
enum Projections {
    Fused(Weight),
    /// Candle matrices of different types: computed one by one and interleaved.
    Separate(Vec<Weight>),
}

/// A `[rows, cols]` weight matrix and how it is multiplied.
#[derive(Clone)]
struct Weight {
    rows: usize,
    cols: usize,
    kind: WeightKind,
}

#[derive(Clone)]
enum WeightKind {
    /// Row-major f32, multiplied with [`kernels::matmul_f32`]. Shared between the embedding and
    /// a tied output layer.
    F32(Arc<Vec<f32>>),
    /// Sluice's 8-bit kernel, which reads the weights once per call for every row of a batch.
    Q8(Arc<Q8Matrix>),
    /// candle's `QMatMul` ([`WeightFormat::AsStored`]): allocates tensors on every call.
    Candle(QMatMul),
}

/// Reusable buffers of the matmul kernels.
#[derive(Debug, Default)]
struct MatmulScratch {
    f32: Vec<f32>,
    q8: Q8Scratch,
    /// One projection's output before it is interleaved ([`Projections::Separate`]).
    part: Vec<f32>,
}

impl Weight {
    /// Holds dense row-major values in `format` (f32, or Q8_0 where the row length allows).
    fn dense(
        values: Vec<f32>,
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Weight, LocalError> {
        let kind = if format == WeightFormat::Q8_0 && cols.is_multiple_of(32) {
            WeightKind::Q8(Arc::new(
                Q8Matrix::from_f32(&values, rows, cols).map_err(LocalError::InvalidModel)?,
            ))
        } else {
            WeightKind::F32(Arc::new(values))
        };
        Ok(Weight { rows, cols, kind })
    }

    /// A file's matrix in the requested in-memory format.
    fn load(t: QTensor, format: WeightFormat, device: &Device) -> Result<Weight, LocalError> {
        let (rows, cols) = t.shape().dims2()?;
        match format {
            WeightFormat::AsStored => Ok(Weight {
                rows,
                cols,
                kind: WeightKind::Candle(QMatMul::from_qtensor(t)?),
            }),
            _ => Weight::dense(dequantized(&t, device)?, rows, cols, format),
        }
    }

    /// `out[n, rows] = x[n, cols] · Wᵀ`.
    fn matmul(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        s: &mut MatmulScratch,
    ) -> Result<(), LocalError> {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        match &self.kind {
            WeightKind::F32(w) => kernels::matmul_f32(w, self.cols, x, n, out, &mut s.f32),
            WeightKind::Q8(m) => m
                .matmul(x, n, out, &mut s.q8)
                .map_err(LocalError::InvalidInput)?,
            WeightKind::Candle(m) => {
                let y = m.forward(&Tensor::from_slice(x, (n, self.cols), &Device::Cpu)?)?;
                let y = y.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
        Ok(())
    }

    /// `x @ Wᵀ` on candle tensors (the path of [`WeightFormat::AsStored`]).
    fn forward_tensor(&self, x: &Tensor) -> Result<Tensor, LocalError> {
        match &self.kind {
            WeightKind::Candle(m) => Ok(m.forward(x)?),
            _ => {
                let n = x.dim(0)?;
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; n * self.rows];
                self.matmul(&input, n, &mut out, &mut MatmulScratch::default())?;
                Ok(Tensor::from_vec(out, (n, self.rows), &Device::Cpu)?)
            }
        }
    }

    /// Row `r` as f32 into `out` (the embedding lookup).
    fn row(&self, r: usize, out: &mut [f32]) -> Result<(), LocalError> {
        match &self.kind {
            WeightKind::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
            WeightKind::Q8(m) => m.dequantize_row(r, out),
            WeightKind::Candle(m) => {
                let row = match m {
                    QMatMul::QTensor(q) => q.embedding(&Tensor::new(&[r as u32], &Device::Cpu)?)?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.get(r)?,
                };
                let row = row.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&row);
            }
        }
        Ok(())
    }
}

/// All values of a tensor as f32, row-major.
fn dequantized(t: &QTensor, device: &Device) -> Result<Vec<f32>, LocalError> {
    Ok(t.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Projections {
    fn new(parts: Vec<QTensor>, device: &Device, format: WeightFormat) -> Result<Self, LocalError> {
        let k = parts[0].shape().dims2()?.1;
        let widths = parts
            .iter()
            .map(|p| p.shape().dims2().map(|d| d.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rows = widths.iter().sum::<usize>();
        if format != WeightFormat::AsStored {
            let mut values = Vec::with_capacity(rows * k);
            for p in &parts {
                values.extend_from_slice(&dequantized(p, device)?);
            }
            return Ok(Self::Fused(Weight::dense(values, rows, k, format)?));
        }
        let dtype = parts[0].dtype();
        if parts.len() < 2 || parts.iter().any(|p| p.dtype() != dtype) {
            return Ok(Self::Separate(
                parts
                    .into_iter()
                    .map(|p| Weight::load(p, format, device))
                    .collect::<Result<_, _>>()?,
            ));
        }
        // Rows are stored one after the other, so stacking the matrices is
        // concatenating their bytes.
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.storage_size_in_bytes()).sum());
        for p in &parts {
            bytes.extend_from_slice(&p.data()?);
        }
        drop(parts);
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
        let stacked = QTensor::new(storage, (rows, k))?;
        Ok(Self::Fused(Weight::load(stacked, format, device)?))
    }

    /// [`Projections::matmul`] on candle tensors: `[n, Σ widths]`.
    fn forward_tensor(&self, x: &Tensor) -> Result<Tensor, LocalError> {
        match self {
            Self::Fused(w) => w.forward_tensor(x),
            Self::Separate(ws) => {
                let parts = ws
                    .iter()
                    .map(|w| w.forward_tensor(x))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Tensor::cat(&parts, 1)?)
            }
        }
    }

    /// `x @ W_iᵀ` for every projection, side by side in `out` (`[n, Σ widths]`).
    fn matmul(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        s: &mut MatmulScratch,
    ) -> Result<(), LocalError> {
        match self {
            Self::Fused(w) => w.matmul(x, n, out, s),
            Self::Separate(ws) => {
                let total = out.len() / n;
                let mut start = 0;
                for w in ws {
                    let mut part = std::mem::take(&mut s.part);
                    let p = kernels::grown(&mut part, n * w.rows);
                    let res = w.matmul(x, n, p, s);
                    for (dst, src) in out.chunks_exact_mut(total).zip(p.chunks_exact(w.rows)) {
                        dst[start..start + w.rows].copy_from_slice(src);
                    }
                    s.part = part;
                    res?;
                    start += w.rows;
                }
                Ok(())
            }
        }
    }
}

/// A Llama-family chat model loaded from a GGUF file: its weights (loaded
/// once and shared by every sequence), tokenizer and chat template.
///
/// `LlamaModel` is `Send + Sync` and every method takes `&self`: the state of
/// a sequence lives in its [`KvCache`], so one model (e.g. in an `Arc`) serves
/// any number of sequences.
pub struct LlamaModel {
    id: u64,
    info: ModelInfo,
    cfg: Config,
    /// The token embeddings, in the model's weight format (shared with a tied output layer).
    embed: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Weight,
    /// The workspace of [`LlamaModel::prefill`], [`LlamaModel::decode`] and
    /// [`LlamaModel::forward_batch`], so that repeated calls reuse its buffers; a call that finds
    /// it busy uses a fresh one.
    spare: Mutex<Workspace>,
    tokenizer: GgufTokenizer,
    template: Option<ChatTemplate>,
    fallback_template: ChatTemplate,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The keys and values one sequence has produced so far, for every layer.
///
/// Created by [`LlamaModel::new_cache`] and usable only with that model. The
/// buffers are preallocated and grow by chunks (at least 256 positions, or half
/// the current capacity), so appending a token writes in place instead of
/// copying the whole cache; [`KvCache::reserve`] sizes them up front.
pub struct KvCache {
    model_id: u64,
    len: usize,
    capacity: usize,
    max_len: usize,
    n_layer: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Per layer `(keys, values)`, each `[capacity][n_kv_head][head_dim]` f32;
    /// empty until the first tokens arrive.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl KvCache {
    /// Number of positions (tokens) the cache holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers can hold before they grow again.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Memory held by the buffers, in bytes (their capacity, not just the
    /// used part).
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.capacity * self.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Bytes one more position costs once the buffers have grown to hold it.
    pub fn bytes_per_token(&self) -> usize {
        self.n_layer * 2 * self.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Forgets all positions, keeping the buffers for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` positions (e.g. to reuse a shared prompt
    /// prefix); a larger `len` changes nothing.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Preallocates room for exactly `positions` positions in total (e.g.
    /// prompt plus `max_tokens`), so the buffers do not grow during generation
    /// and hold no more than that: a batch's KV memory is what it accounted.
    pub fn reserve(&mut self, positions: usize) -> Result<(), LocalError> {
        if positions > self.max_len {
            return Err(LocalError::ContextOverflow {
                needed: positions,
                limit: self.max_len,
            });
        }
        if positions > self.capacity {
            self.resize_to(positions);
        }
        Ok(())
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Makes room for `needed` positions in total, keeping the ones held.
    fn grow_to(&mut self, needed: usize) {
        if needed <= self.capacity {
            return;
        }
        let grown = self.capacity + CACHE_CHUNK.max(self.capacity / 2);
        let new_cap = needed
            .max(grown)
            .div_ceil(CACHE_CHUNK)
            .saturating_mul(CACHE_CHUNK)
            .min(self.max_len)
            .max(needed);
        self.resize_to(new_cap);
    }

    /// Sets the buffers' room to `new_cap` positions, keeping the ones held.
    fn resize_to(&mut self, new_cap: usize) {
        let len = new_cap * self.kv_dim();
        if self.layers.is_empty() {
            self.layers = (0..self.n_layer)
                .map(|_| (Vec::new(), Vec::new()))
                .collect();
        }
        for (k, v) in &mut self.layers {
            for buf in [k, v] {
                buf.reserve_exact(len - buf.len());
                buf.resize(len, 0.0);
            }
        }
        self.capacity = new_cap;
    }
}

/// The sequences of one forward pass: for each, its [`KvCache`] and the tokens it appends (one
/// for a decode step, several for a piece of prompt). Implemented for slices of
/// `(&mut KvCache, u32)` and `(&mut KvCache, &[u32])`; a scheduler can implement it over its own
/// sequence records so that building a step allocates nothing.
pub trait Batch: Sync {
    /// Number of sequences.
    fn sequences(&self) -> usize;
    /// The tokens sequence `i` appends.
    fn tokens(&self, i: usize) -> &[u32];
    /// Sequence `i`'s cache.
    fn cache(&self, i: usize) -> &KvCache;
    /// Sequence `i`'s cache, to append to.
    fn cache_mut(&mut self, i: usize) -> &mut KvCache;
}

impl Batch for [(&mut KvCache, u32)] {
    fn sequences(&self) -> usize {
        self.len()
    }
    fn tokens(&self, i: usize) -> &[u32] {
        std::slice::from_ref(&self[i].1)
    }
    fn cache(&self, i: usize) -> &KvCache {
        self[i].0
    }
    fn cache_mut(&mut self, i: usize) -> &mut KvCache {
        self[i].0
    }
}

impl Batch for [(&mut KvCache, &[u32])] {
    fn sequences(&self) -> usize {
        self.len()
    }
    fn tokens(&self, i: usize) -> &[u32] {
        self[i].1
    }
    fn cache(&self, i: usize) -> &KvCache {
        self[i].0
    }
    fn cache_mut(&mut self, i: usize) -> &mut KvCache {
        self[i].0
    }
}

/// The activation buffers of the forward pass, reused from call to call: each grows to the
/// largest batch it has seen and never shrinks, so once a [`Workspace`] has run a step of a given
/// size, further steps of at most that size (and caches that do not grow) allocate nothing with
/// [`WeightFormat::F32`] and [`WeightFormat::Q8_0`] weights.
///
/// A workspace is not tied to a model; keep one per thread that runs forward passes.
#[derive(Debug, Default)]
pub struct Workspace {
    /// The residual stream, `[rows, hidden]`.
    x: Vec<f32>,
    /// Its normalized copy, the input of the projections.
    h: Vec<f32>,
    /// Queries, keys and values, `[rows, q_dim + 2 kv_dim]`.
    qkv: Vec<f32>,
    /// Attention output, `[rows, q_dim]`.
    att: Vec<f32>,
    /// Output of the attention and down projections, `[rows, hidden]`.
    proj: Vec<f32>,
    /// Gate and up projections, `[rows, 2 ff]`.
    gate_up: Vec<f32>,
    /// `silu(gate) · up`, `[rows, ff]`.
    act: Vec<f32>,
    /// Rotary cosines and sines of each row's position, `[rows, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Each row's sequence and position.
    row_seq: Vec<usize>,
    row_pos: Vec<usize>,
    /// Attention scores, `[tasks, longest context]`.
    scores: Vec<f32>,
    /// The normalized last row of each sequence, `[sequences, hidden]`.
    last: Vec<f32>,
    /// Logits, `[sequences, vocab]`.
    logits: Vec<f32>,
    matmul: MatmulScratch,
}

impl Workspace {
    /// An empty workspace; its buffers grow on first use.
    pub fn new() -> Workspace {
        Workspace::default()
    }
}

impl LlamaModel {
    /// Loads a Llama-family GGUF model (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants,
    /// F16 or F32 weights) with its tokenizer and chat template.
    ///
    /// Errors: [`LocalError::ModelNotFound`] for a missing file,
    /// [`LocalError::InvalidGguf`] for a file that is not GGUF (or uses a
    /// tensor type candle cannot read), [`LocalError::UnsupportedArchitecture`]
    /// for a non-Llama model, [`LocalError::InvalidModel`] for missing or
    /// inconsistent metadata and tensors.
    pub fn load(path: &Path) -> Result<LlamaModel, LocalError> {
        Self::load_with(path, LoadOptions::default())
    }

    /// [`LlamaModel::load`] with options: `weights` chooses the in-memory format of the weight
    /// matrices. [`WeightFormat::F32`] takes 4 bytes per weight, but on CPU the f32 matrix multiply
    /// is faster than the quantized kernels for Q4_1/Q5 files and, unlike them, costs less per row
    /// as the batch grows — which is what makes continuous batching pay.
    pub fn load_with(path: &Path, options: LoadOptions) -> Result<LlamaModel, LocalError> {
        let format = options.weights;
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LocalError::ModelNotFound {
                path: path.to_path_buf(),
            },
            _ => LocalError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let invalid = |message: String| LocalError::InvalidGguf {
            path: path.to_path_buf(),
            message,
        };
        let io = |e: std::io::Error| LocalError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        if path.is_dir() {
            return Err(invalid("it is a directory".into()));
        }
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        match reader.read_exact(&mut magic) {
            Ok(()) if &magic == b"GGUF" => {}
            Ok(()) => {
                return Err(invalid(format!(
                    "bad magic bytes {magic:02x?}, expected \"GGUF\""
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(invalid("the file is shorter than a GGUF header".into()));
            }
            Err(e) => return Err(io(e)),
        }
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        let content = gguf_file::Content::read(&mut reader).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("unknown dtype") {
                invalid(format!(
                    "{msg} (a quantization candle does not support, e.g. IQ or TQ types)"
                ))
            } else {
                invalid(msg)
            }
        })?;
        let md = Metadata::new(&content.metadata);

        let architecture = md
            .string("general.architecture")?
            .ok_or_else(|| invalid("metadata lacks general.architecture".into()))?
            .to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(LocalError::UnsupportedArchitecture {
                architecture,
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        }
        let key = |k: &str| format!("{architecture}.{k}");
        if md.usize(&key("expert_count"))?.unwrap_or(0) > 1 {
            return Err(LocalError::InvalidModel(
                "mixture-of-experts models are not supported".into(),
            ));
        }

        let tokenizer = GgufTokenizer::from_metadata(md)?;
        let device = Device::Cpu;

        // Hyperparameters.
        let n_layer = md.required_usize(&key("block_count"))?;
        let hidden = md.required_usize(&key("embedding_length"))?;
        let n_head = md.required_usize(&key("attention.head_count"))?;
        let n_kv_head = md.usize(&key("attention.head_count_kv"))?.unwrap_or(n_head);
        if n_layer == 0 || hidden == 0 || n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(LocalError::InvalidModel(format!(
                "inconsistent hyperparameters: {n_layer} layers, width {hidden}, {n_head} heads, {n_kv_head} KV heads"
            )));
        }
        let head_dim = md
            .usize(&key("attention.key_length"))?
            .unwrap_or(hidden / n_head);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(LocalError::InvalidModel(format!(
                "invalid head size {head_dim}"
            )));
        }
        if let Some(v) = md.usize(&key("attention.value_length"))?
            && v != head_dim
        {
            return Err(LocalError::InvalidModel(format!(
                "key length {head_dim} and value length {v} differ"
            )));
        }
        // The file's numbers may be anything: before they size a single allocation, they are
        // checked against the shapes of the tensors the file holds (which are bounded by its
        // size): the width against the embedding, the heads against the first query projection,
        // and each layer must have its tensors.
        let dims_of = |name: &str| -> Result<Vec<usize>, LocalError> {
            content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec())
                .ok_or_else(|| LocalError::InvalidModel(format!("missing tensor {name}")))
        };
        let embed_dims = dims_of("token_embd.weight")?;
        if embed_dims.len() != 2 || embed_dims[1] != hidden {
            return Err(LocalError::InvalidModel(format!(
                "tensor token_embd.weight has shape {embed_dims:?}, expected [vocabulary, {hidden}]"
            )));
        }
        let q_dims = dims_of("blk.0.attn_q.weight")?;
        if n_head
            .checked_mul(head_dim)
            .is_none_or(|q| q_dims != [q, hidden])
        {
            return Err(LocalError::InvalidModel(format!(
                "tensor blk.0.attn_q.weight has shape {q_dims:?}, expected [{n_head} heads × {head_dim}, {hidden}]"
            )));
        }
        for l in 0..n_layer {
            dims_of(&format!("blk.{l}.attn_norm.weight"))?;
        }
        let rope_dim = md.usize(&key("rope.dimension_count"))?.unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(LocalError::InvalidModel(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim} dimensions) are not supported"
            )));
        }
        let eps = md
            .f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let freq_base = md.f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let context = md.usize(&key("context_length"))?.unwrap_or(4096).max(1);
        let mut rope_inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / freq_base.powf(i as f32 / head_dim as f32))
            .collect();
        let mut rope_pos_scale = 1f32;
        match md.string(&key("rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") => {
                let factor = md.f32(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if factor > 0.0 {
                    rope_pos_scale = 1.0 / factor;
                }
            }
            Some(other) => tracing::warn!(
                scaling = other,
                "RoPE scaling type not implemented; positions are not rescaled"
            ),
        }

        // Tensors.
        let tensor = |reader: &mut BufReader<File>, name: &str| -> Result<QTensor, LocalError> {
            if !content.tensor_infos.contains_key(name) {
                return Err(LocalError::InvalidModel(format!("missing tensor {name}")));
            }
            content
                .tensor(reader, name, &device)
                .map_err(|e| invalid(format!("reading tensor {name}: {e}")))
        };
        let check = |t: &QTensor, name: &str, dims: &[usize]| -> Result<(), LocalError> {
            if t.shape().dims() != dims {
                return Err(LocalError::InvalidModel(format!(
                    "tensor {name} has shape {:?}, expected {dims:?}",
                    t.shape().dims()
                )));
            }
            Ok(())
        };
        let matrix = |reader: &mut BufReader<File>, name: &str, dims: [usize; 2]| {
            let t = tensor(reader, name)?;
            check(&t, name, &dims)?;
            Ok::<_, LocalError>(t)
        };
        let matmul = |reader: &mut BufReader<File>, name: &str, dims: [usize; 2]| {
            Weight::load(matrix(reader, name, dims)?, format, &device)
        };
        let vector = |reader: &mut BufReader<File>, name: &str| {
            let t = tensor(reader, name)?;
            check(&t, name, &[hidden])?;
            dequantized(&t, &device)
        };

        if let Some(info) = content.tensor_infos.get("rope_freqs.weight") {
            let factors = info
                .read(&mut reader, content.tensor_data_offset, &device)
                .and_then(|t| t.dequantize(&device))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| invalid(format!("reading tensor rope_freqs.weight: {e}")))?;
            if factors.len() != rope_inv_freq.len() {
                return Err(LocalError::InvalidModel(format!(
                    "rope_freqs.weight has {} entries, expected {}",
                    factors.len(),
                    rope_inv_freq.len()
                )));
            }
            for (f, d) in rope_inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }

        let embed = tensor(&mut reader, "token_embd.weight")?;
        let vocab = embed.shape().dims2().map(|d| d.0).unwrap_or(0);
        check(&embed, "token_embd.weight", &[vocab, hidden])?;
        if vocab != tokenizer.vocab_size() {
            return Err(LocalError::InvalidModel(format!(
                "the embedding has {vocab} rows but the vocabulary {} tokens",
                tokenizer.vocab_size()
            )));
        }
        let embed = match format {
            WeightFormat::AsStored => Weight {
                rows: vocab,
                cols: hidden,
                kind: WeightKind::Candle(QMatMul::from_arc(Arc::new(embed))?),
            },
            _ => Weight::load(embed, format, &device)?,
        };
        let norm = vector(&mut reader, "output_norm.weight")?;
        // A tied output layer shares the embedding's matrix.
        let output = if content.tensor_infos.contains_key("output.weight") {
            matmul(&mut reader, "output.weight", [vocab, hidden])?
        } else {
            embed.clone()
        };
        let q_dim = n_head * head_dim;
        let kv_dim = n_kv_head * head_dim;
        let ff = md
            .usize(&key("feed_forward_length"))?
            .or_else(|| {
                content
                    .tensor_infos
                    .get("blk.0.ffn_gate.weight")
                    .and_then(|i| i.shape.dims2().ok())
                    .map(|d| d.0)
            })
            .ok_or_else(|| LocalError::InvalidModel("cannot tell the feed-forward width".into()))?;
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let p = |s: &str| format!("blk.{l}.{s}.weight");
            let qkv = vec![
                matrix(&mut reader, &p("attn_q"), [q_dim, hidden])?,
                matrix(&mut reader, &p("attn_k"), [kv_dim, hidden])?,
                matrix(&mut reader, &p("attn_v"), [kv_dim, hidden])?,
            ];
            let gate_up = vec![
                matrix(&mut reader, &p("ffn_gate"), [ff, hidden])?,
                matrix(&mut reader, &p("ffn_up"), [ff, hidden])?,
            ];
            layers.push(Layer {
                attn_norm: vector(&mut reader, &p("attn_norm"))?,
                qkv: Projections::new(qkv, &device, format)?,
                wo: matmul(&mut reader, &p("attn_output"), [hidden, q_dim])?,
                ffn_norm: vector(&mut reader, &p("ffn_norm"))?,
                gate_up: Projections::new(gate_up, &device, format)?,
                w_down: matmul(&mut reader, &p("ffn_down"), [hidden, ff])?,
            });
        }

        // Description.
        let quantization = match md.u64("general.file_type")?.and_then(file_type_name) {
            Some(name) => name.to_string(),
            None => dominant_weight_type(&content),
        };
        let parameters = content
            .tensor_infos
            .values()
            .map(|i| crate::inspect::element_count(i.shape.dims()))
            .fold(0u64, u64::saturating_add);
        let name = match md.string("general.name")? {
            Some(n) if !n.trim().is_empty() => n.to_string(),
            _ => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let info = ModelInfo {
            name,
            architecture,
            quantization,
            context_length: context,
            vocab_size: vocab,
            n_layer,
            embedding_length: hidden,
            parameters,
        };

        // Chat template.
        let special = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
                .to_string()
        };
        let bos_text = special(tokenizer.bos_token_id());
        let eos_text = special(tokenizer.eos_token_ids().first().copied());
        let template = match md.string("tokenizer.chat_template")? {
            Some(src) => match ChatTemplate::new(src, bos_text.clone(), eos_text.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "the GGUF chat template does not compile; using ChatML");
                    None
                }
            },
            None => None,
        };
        let fallback_template = ChatTemplate::chatml(bos_text, eos_text);

        tracing::debug!(?info, "loaded GGUF model");
        Ok(LlamaModel {
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            info,
            cfg: Config {
                n_layer,
                n_head,
                n_kv_head,
                head_dim,
                vocab,
                context,
                eps,
                rope_inv_freq,
                rope_pos_scale,
            },
            embed,
            layers,
            norm,
            output,
            spare: Mutex::new(Workspace::new()),
            tokenizer,
            template,
            fallback_template,
        })
    }

    /// What the model is.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// The chat template the GGUF file ships (`tokenizer.chat_template`), if
    /// it has one that compiles.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The template to build prompts with: the model's own, else ChatML.
    pub fn chat_template_or_default(&self) -> &ChatTemplate {
        self.template.as_ref().unwrap_or(&self.fallback_template)
    }

    /// The prompt tokens of a conversation: the messages' content escaped
    /// ([`GgufTokenizer::escape_content`], so control tokens typed in a message stay text), the
    /// chat template ([`Self::chat_template_or_default`]) rendered, and the text encoded with
    /// [`GgufTokenizer::encode_prompt`] (one BOS where the model wants it).
    pub fn chat_prompt(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, LocalError> {
        let text = self
            .chat_template_or_default()
            .render(&self.escaped(messages), add_generation_prompt)?;
        self.tokenizer.encode_prompt(&text)
    }

    /// Like [`Self::chat_prompt`] for a conversation whose last message is the start of the
    /// assistant's answer (a prefill): the prompt ends right after that message's content, so
    /// that the model goes on from it ([`ChatTemplate::render_continuing`]). `None` when the
    /// template cannot be cut so (the caller then starts a fresh turn).
    pub fn chat_prompt_continuing(
        &self,
        messages: &[TemplateMessage],
    ) -> Result<Option<Vec<u32>>, LocalError> {
        match self
            .chat_template_or_default()
            .render_continuing(&self.escaped(messages))?
        {
            Some(text) => self.tokenizer.encode_prompt(&text).map(Some),
            None => Ok(None),
        }
    }

    /// The messages with their content escaped ([`GgufTokenizer::escape_content`]).
    fn escaped(&self, messages: &[TemplateMessage]) -> Vec<TemplateMessage> {
        messages
            .iter()
            .map(|m| TemplateMessage {
                role: m.role.clone(),
                content: self.tokenizer.escape_content(&m.content).into_owned(),
            })
            .collect()
    }

    /// A new, empty cache for one sequence. It allocates nothing until the
    /// sequence's first tokens are run (or [`KvCache::reserve`]).
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            model_id: self.id,
            len: 0,
            capacity: 0,
            max_len: self.cfg.context,
            n_layer: self.cfg.n_layer,
            n_kv_head: self.cfg.n_kv_head,
            head_dim: self.cfg.head_dim,
            layers: Vec::new(),
        }
    }

    /// Runs `f` with the model's spare workspace, or a fresh one when another call holds it.
    fn with_workspace<T>(&self, f: impl FnOnce(&mut Workspace) -> T) -> T {
        match self.spare.try_lock() {
            Ok(mut ws) => f(&mut ws),
            Err(_) => f(&mut Workspace::new()),
        }
    }

    /// Runs the prompt tokens of one sequence, appending them to its cache
    /// (which may already hold earlier turns); returns the logits of the last
    /// position. Long prompts are processed in chunks.
    pub fn prefill(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>, LocalError> {
        if tokens.is_empty() {
            return Err(LocalError::InvalidInput(
                "prefill needs at least one token".into(),
            ));
        }
        self.check_cache(cache)?;
        self.check_room(cache, tokens.len())?;
        self.with_workspace(|ws| {
            let chunks = tokens.len().div_ceil(PREFILL_CHUNK);
            for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
                let mut seg = [(&mut *cache, chunk)];
                let logits = self.forward(&mut seg[..], ws, i + 1 == chunks)?;
                if i + 1 == chunks {
                    return Ok(logits.to_vec());
                }
            }
            unreachable!("the last chunk returns logits")
        })
    }

    /// One decode step for several sequences in one batched forward pass:
    /// each `(cache, token)` appends `token` to its sequence. The projections
    /// and MLP run on an `[N, hidden]` matrix, so the weights are
    /// read once for all N tokens; rotary embeddings use each sequence's own
    /// position and attention runs per sequence against its own cache.
    /// Returns one logits vector per sequence, in order (see
    /// [`LlamaModel::decode_into`] for the variant that allocates nothing).
    pub fn decode(&self, batch: &mut [(&mut KvCache, u32)]) -> Result<Vec<Vec<f32>>, LocalError> {
        self.with_workspace(|ws| {
            let logits = self.forward_into(batch, ws)?;
            Ok(logits.chunks(self.cfg.vocab).map(<[f32]>::to_vec).collect())
        })
    }

    /// [`LlamaModel::decode`] into a workspace: returns the `[N, vocab]` logits, row `i` for
    /// sequence `i`, borrowed from `ws`. Once `ws` has run a step of N sequences and the caches
    /// have room (see [`KvCache::reserve`]), this allocates nothing with f32 or Q8_0 weights.
    pub fn decode_into<'w>(
        &self,
        batch: &mut [(&mut KvCache, u32)],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32], LocalError> {
        self.forward_into(batch, ws)
    }

    /// The general step: each `(cache, tokens)` appends one or more tokens to
    /// its sequence, all in one forward pass (e.g. a prompt chunk riding along
    /// with other sequences' decode steps). Returns the logits of each
    /// sequence's last new position, in order. Keep prompt pieces moderate
    /// (say ≤ 512 tokens).
    pub fn forward_batch(
        &self,
        batch: &mut [(&mut KvCache, &[u32])],
    ) -> Result<Vec<Vec<f32>>, LocalError> {
        self.with_workspace(|ws| {
            let logits = self.forward_into(batch, ws)?;
            Ok(logits.chunks(self.cfg.vocab).map(<[f32]>::to_vec).collect())
        })
    }

    /// [`LlamaModel::forward_batch`] over any [`Batch`], into a workspace: returns the
    /// `[sequences, vocab]` logits of each sequence's last new position, borrowed from `ws`.
    /// Allocation-free under the conditions of [`LlamaModel::decode_into`].
    pub fn forward_into<'w, B: Batch + ?Sized>(
        &self,
        batch: &mut B,
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32], LocalError> {
        for i in 0..batch.sequences() {
            let (cache, tokens) = (batch.cache(i), batch.tokens(i));
            if tokens.is_empty() {
                return Err(LocalError::InvalidInput(
                    "every sequence of a batch needs at least one token".into(),
                ));
            }
            self.check_cache(cache)?;
            self.check_room(cache, tokens.len())?;
        }
        self.forward(batch, ws, true)
    }

    fn check_cache(&self, cache: &KvCache) -> Result<(), LocalError> {
        if cache.model_id != self.id {
            return Err(LocalError::InvalidInput(
                "the KV cache was created by another model".into(),
            ));
        }
        Ok(())
    }

    fn check_room(&self, cache: &KvCache, extra: usize) -> Result<(), LocalError> {
        let needed = cache.len + extra;
        if needed > self.cfg.context {
            return Err(LocalError::ContextOverflow {
                needed,
                limit: self.cfg.context,
            });
        }
        Ok(())
    }

    /// Runs the batch through the model, appending to its caches. With `want_logits`, returns
    /// the `[sequences, vocab]` logits of each sequence's last token (else an empty slice). The
    /// caches must have been checked; token ids are checked here, before anything changes.
    ///
    /// All rows of the batch (every new token of every sequence) go through the projections and
    /// the MLP together as one `[rows, hidden]` matrix, so each weight is read once per step;
    /// rotary embeddings use each row's own position, and each row attends to its own sequence's
    /// cache up to its own position (causal within a multi-token piece).
    fn forward<'w, B: Batch + ?Sized>(
        &self,
        batch: &mut B,
        ws: &'w mut Workspace,
        want_logits: bool,
    ) -> Result<&'w [f32], LocalError> {
        let cfg = &self.cfg;
        let seqs = batch.sequences();
        if seqs == 0 {
            return Ok(&[]);
        }
        let (d, half) = (cfg.head_dim, cfg.head_dim / 2);
        let hidden = self.info.embedding_length;
        let q_dim = cfg.n_head * d;
        let kv_dim = cfg.n_kv_head * d;
        let qkv_w = q_dim + 2 * kv_dim;
        let ff = self.layers.first().map_or(0, |l| l.w_down.cols);
        let mut rows = 0;
        for i in 0..seqs {
            for &t in batch.tokens(i) {
                if t as usize >= cfg.vocab {
                    return Err(LocalError::InvalidToken {
                        id: t,
                        vocab_size: cfg.vocab,
                    });
                }
            }
            rows += batch.tokens(i).len();
        }
        if matches!(self.embed.kind, WeightKind::Candle(_)) {
            return self.forward_candle(batch, ws, want_logits);
        }

        let Workspace {
            x,
            h,
            qkv,
            att,
            proj,
            gate_up,
            act,
            cos,
            sin,
            row_seq,
            row_pos,
            scores,
            last,
            logits,
            matmul,
        } = ws;
        let x = kernels::grown(x, rows * hidden);
        let h = kernels::grown(h, rows * hidden);
        let qkv = kernels::grown(qkv, rows * qkv_w);
        let att = kernels::grown(att, rows * q_dim);
        let proj = kernels::grown(proj, rows * hidden);
        let gate_up = kernels::grown(gate_up, rows * 2 * ff);
        let act = kernels::grown(act, rows * ff);
        let cos = kernels::grown(cos, rows * half);
        let sin = kernels::grown(sin, rows * half);
        let row_seq = kernels::grown(row_seq, rows);
        let row_pos = kernels::grown(row_pos, rows);

        // Embeddings, and each row's sequence, position and rotary angles.
        let mut row = 0;
        let mut longest = 0;
        for i in 0..seqs {
            let past = batch.cache(i).len;
            let tokens = batch.tokens(i);
            longest = longest.max(past + tokens.len());
            for (j, &t) in tokens.iter().enumerate() {
                self.embed
                    .row(t as usize, &mut x[row * hidden..(row + 1) * hidden])?;
                row_seq[row] = i;
                row_pos[row] = past + j;
                let pos = (past + j) as f32 * cfg.rope_pos_scale;
                let (c, s) = (
                    &mut cos[row * half..(row + 1) * half],
                    &mut sin[row * half..(row + 1) * half],
                );
                for ((c, s), &f) in c.iter_mut().zip(s).zip(&cfg.rope_inv_freq) {
                    let angle = pos * f;
                    *c = angle.cos();
                    *s = angle.sin();
                }
                row += 1;
            }
            let needed = past + tokens.len();
            batch.cache_mut(i).grow_to(needed);
            // Scores are sized by capacity, which changes less often than the length.
            longest = longest.max(batch.cache(i).capacity);
        }

        // Attention runs in a few tasks per thread over the rows, each with its own scores.
        let threads = rayon::current_num_threads().max(1);
        let task_rows = rows.div_ceil(threads * 4).max(1);
        let tasks = rows.div_ceil(task_rows);
        let scores = kernels::grown(scores, tasks * longest);
        let shape = kernels::AttnShape {
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: d,
        };

        for (l, layer) in self.layers.iter().enumerate() {
            kernels::rms_norm(x, &layer.attn_norm, cfg.eps, h);
            layer.qkv.matmul(h, rows, qkv, matmul)?;
            for (r, q) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                let (c, s) = (
                    &cos[r * half..(r + 1) * half],
                    &sin[r * half..(r + 1) * half],
                );
                kernels::rope_interleaved(&mut q[..q_dim + kv_dim], d, c, s);
                let pos = row_pos[r];
                let (keys, values) = &mut batch.cache_mut(row_seq[r]).layers[l];
                keys[pos * kv_dim..(pos + 1) * kv_dim].copy_from_slice(&q[q_dim..q_dim + kv_dim]);
                values[pos * kv_dim..(pos + 1) * kv_dim].copy_from_slice(&q[q_dim + kv_dim..]);
            }
            {
                let batch: &B = batch;
                let (qkv, row_seq, row_pos) = (&*qkv, &*row_seq, &*row_pos);
                att.par_chunks_mut(task_rows * q_dim)
                    .zip(scores.par_chunks_mut(longest))
                    .enumerate()
                    .for_each(|(task, (att, scores))| {
                        for (i, out) in att.chunks_exact_mut(q_dim).enumerate() {
                            let r = task * task_rows + i;
                            let pos = row_pos[r];
                            let (keys, values) = &batch.cache(row_seq[r]).layers[l];
                            kernels::attend_row(kernels::AttendRow {
                                shape,
                                q: &qkv[r * qkv_w..r * qkv_w + q_dim],
                                keys: &keys[..(pos + 1) * kv_dim],
                                values: &values[..(pos + 1) * kv_dim],
                                pos,
                                scores,
                                out,
                            });
                        }
                    });
            }
            layer.wo.matmul(att, rows, proj, matmul)?;
            add_assign(x, proj);

            kernels::rms_norm(x, &layer.ffn_norm, cfg.eps, h);
            layer.gate_up.matmul(h, rows, gate_up, matmul)?;
            kernels::silu_mul(gate_up, ff, act);
            layer.w_down.matmul(act, rows, proj, matmul)?;
            add_assign(x, proj);
        }
        for i in 0..seqs {
            let n = batch.tokens(i).len();
            batch.cache_mut(i).len += n;
        }
        if !want_logits {
            return Ok(&[]);
        }

        // The normalized last row of each sequence, through the output layer.
        let last = kernels::grown(last, seqs * hidden);
        let mut end = 0;
        for i in 0..seqs {
            end += batch.tokens(i).len();
            kernels::rms_norm(
                &x[(end - 1) * hidden..end * hidden],
                &self.norm,
                cfg.eps,
                &mut last[i * hidden..(i + 1) * hidden],
            );
        }
        let logits = kernels::grown(logits, seqs * cfg.vocab);
        self.output.matmul(last, seqs, logits, matmul)?;
        Ok(logits)
    }

    /// [`LlamaModel::forward`] for weights kept in the file's quantization: candle tensor ops
    /// throughout, in the order candle's own `quantized_llama` runs them, because candle's
    /// quantized matmuls quantize their input to 8 bits and so amplify the last-bit differences
    /// a hand-written pass would make (this path gives candle's greedy tokens exactly). It
    /// allocates tensors on every call; the caches are the same plain buffers.
    fn forward_candle<'w, B: Batch + ?Sized>(
        &self,
        batch: &mut B,
        ws: &'w mut Workspace,
        want_logits: bool,
    ) -> Result<&'w [f32], LocalError> {
        let cfg = &self.cfg;
        let dev = &Device::Cpu;
        let seqs = batch.sequences();
        let rows: usize = (0..seqs).map(|i| batch.tokens(i).len()).sum();
        let (d, half) = (cfg.head_dim, cfg.head_dim / 2);
        let kv_dim = cfg.n_kv_head * d;
        let q_dim = cfg.n_head * d;

        let mut ids = Vec::with_capacity(rows);
        let mut cos = Vec::with_capacity(rows * half);
        let mut sin = Vec::with_capacity(rows * half);
        for i in 0..seqs {
            let past = batch.cache(i).len;
            for (j, &t) in batch.tokens(i).iter().enumerate() {
                ids.push(t);
                let pos = (past + j) as f32 * cfg.rope_pos_scale;
                for &f in &cfg.rope_inv_freq {
                    let angle = pos * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
            let needed = past + batch.tokens(i).len();
            batch.cache_mut(i).grow_to(needed);
        }
        let cos = Tensor::from_vec(cos, (rows, 1, half), dev)?;
        let sin = Tensor::from_vec(sin, (rows, 1, half), dev)?;
        let ids = Tensor::from_vec(ids, rows, dev)?;
        let WeightKind::Candle(embed) = &self.embed.kind else {
            unreachable!("weights kept as stored are candle's")
        };
        let mut x = embed.embedding(&ids)?;
        // Additive causal masks for sequences of more than one new token.
        let masks = (0..seqs)
            .map(|i| {
                let t = batch.tokens(i).len();
                (t > 1)
                    .then(|| causal_mask(t, batch.cache(i).len, dev))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;

        let n_rep = cfg.n_head / cfg.n_kv_head;
        let scale = 1.0 / (d as f64).sqrt();
        let ff = self.layers.first().map_or(0, |l| l.w_down.cols);
        for (l, layer) in self.layers.iter().enumerate() {
            let norm = Tensor::from_slice(&layer.attn_norm, layer.attn_norm.len(), dev)?;
            let h = candle_nn::ops::rms_norm(&x, &norm, cfg.eps)?;
            let qkv = layer.qkv.forward_tensor(&h)?;
            let q = qkv.narrow(1, 0, q_dim)?;
            let k = qkv.narrow(1, q_dim, kv_dim)?;
            let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?;
            let q = q.reshape((rows, cfg.n_head, 1, d))?;
            let k = k.reshape((rows, cfg.n_kv_head, 1, d))?;
            let v = v.reshape((rows, cfg.n_kv_head, d))?;
            let q = candle_nn::rotary_emb::rope_i(&q.contiguous()?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k.contiguous()?, &cos, &sin)?;

            let mut ys = Vec::with_capacity(seqs);
            let mut row = 0;
            for (i, mask) in masks.iter().enumerate() {
                let t = batch.tokens(i).len();
                let cache = batch.cache_mut(i);
                let past = cache.len;
                let total = past + t;
                // [t, heads, 1, d] → [heads, t, d], grouped as [kv_heads, rep * t, d]:
                // query heads sharing a KV head are adjacent.
                let q_s = heads_first(&q.narrow(0, row, t)?, t, cfg.n_head, d)?.reshape((
                    cfg.n_kv_head,
                    n_rep * t,
                    d,
                ))?;
                let (keys, values) = &mut cache.layers[l];
                let new_k = k.narrow(0, row, t)?.flatten_all()?.to_vec1::<f32>()?;
                let new_v = v.narrow(0, row, t)?.flatten_all()?.to_vec1::<f32>()?;
                keys[past * kv_dim..total * kv_dim].copy_from_slice(&new_k);
                values[past * kv_dim..total * kv_dim].copy_from_slice(&new_v);
                let as_heads = |buf: &[f32]| {
                    Tensor::from_slice(&buf[..total * kv_dim], (total, cfg.n_kv_head, d), dev)?
                        .transpose(0, 1)?
                        .contiguous()
                };
                let (keys, values) = (as_heads(&keys[..])?, as_heads(&values[..])?);

                let mut att = (q_s.matmul(&keys.t()?)? * scale)?;
                if let Some(mask) = mask {
                    att = att
                        .reshape((cfg.n_kv_head, n_rep, t, total))?
                        .broadcast_add(mask)?
                        .reshape((cfg.n_kv_head, n_rep * t, total))?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&values)?; // [kv_heads, rep * t, d]
                let y = if t == 1 {
                    y.reshape((1, q_dim))?
                } else {
                    y.reshape((cfg.n_head, t, d))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .reshape((t, q_dim))?
                };
                ys.push(y);
                row += t;
            }
            let y = Tensor::cat(&ys, 0)?;
            x = (x + layer.wo.forward_tensor(&y)?)?;

            let norm = Tensor::from_slice(&layer.ffn_norm, layer.ffn_norm.len(), dev)?;
            let h = candle_nn::ops::rms_norm(&x, &norm, cfg.eps)?;
            let gate_up = layer.gate_up.forward_tensor(&h)?;
            let gate = gate_up.narrow(1, 0, ff)?;
            let up = gate_up.narrow(1, ff, ff)?;
            let mlp = layer
                .w_down
                .forward_tensor(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (x + mlp)?;
        }
        for i in 0..seqs {
            let n = batch.tokens(i).len();
            batch.cache_mut(i).len += n;
        }
        if !want_logits {
            return Ok(&[]);
        }
        let mut idx = Vec::with_capacity(seqs);
        let mut end = 0u32;
        for i in 0..seqs {
            end += batch.tokens(i).len() as u32;
            idx.push(end - 1);
        }
        let last = x.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?;
        let norm = Tensor::from_slice(&self.norm, self.norm.len(), dev)?;
        let last = candle_nn::ops::rms_norm(&last, &norm, cfg.eps)?;
        let logits = self.output.forward_tensor(&last)?;
        let out = kernels::grown(&mut ws.logits, seqs * cfg.vocab);
        out.copy_from_slice(&logits.flatten_all()?.to_vec1::<f32>()?);
        Ok(out)
    }
}

/// `x += y`.
fn add_assign(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// `[t, heads, (1,) d]` rows of one sequence → contiguous `[heads, t, d]`.
fn heads_first(x: &Tensor, t: usize, heads: usize, d: usize) -> candle_core::Result<Tensor> {
    if t == 1 {
        x.reshape((heads, 1, d))
    } else {
        x.reshape((t, heads, d))?.transpose(0, 1)?.contiguous()
    }
}

/// `[t, past + t]` additive mask: query `i` (at position `past + i`) sees keys
/// `0..=past + i`.
fn causal_mask(t: usize, past: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let total = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total), dev)
}

/// The most common quantization among the 2-D weights, by element count.
fn dominant_weight_type(content: &gguf_file::Content) -> String {
    let mut counts: Vec<(GgmlDType, u64)> = Vec::new();
    for info in content.tensor_infos.values() {
        if info.shape.rank() != 2 {
            continue;
        }
        let n = crate::inspect::element_count(info.shape.dims());
        match counts.iter_mut().find(|(t, _)| *t == info.ggml_dtype) {
            Some(c) => c.1 = c.1.saturating_add(n),
            None => counts.push((info.ggml_dtype, n)),
        }
    }
    counts.into_iter().max_by_key(|c| c.1).map_or_else(
        || "unknown".to_string(),
        |(t, _)| ggml_type_name(t).to_string(),
    )
}

fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_shapes_and_values() {
        let m = causal_mask(2, 1, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0], vec![0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(v[1], vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn model_and_cache_are_thread_safe() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<LlamaModel>();
        send_sync::<KvCache>();
        send_sync::<Workspace>();
        send_sync::<GgufTokenizer>();
        send_sync::<ChatTemplate>();
    }
}
