//! The Llama transformer over quantized GGUF weights, with per-sequence KV
//! caches and a batched forward pass for continuous batching.
//!
//! One forward pass runs any number of sequences, each appending one or more
//! tokens to its own [`KvCache`]. All rows of the batch go through the
//! projections and the MLP together as one `[rows, hidden]` matrix, so each
//! quantized weight is read once per step however many sequences there are;
//! rotary embeddings use each row's own position, and attention runs per
//! sequence against that sequence's cache (grouped-query attention without
//! materializing repeated K/V heads).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

use super::error::LocalError;
use super::gguf::{Metadata, file_type_name};
use super::template::ChatTemplate;
use super::tokenizer::GgufTokenizer;

/// Architectures whose GGUF tensors and hyperparameters follow the Llama
/// layout this implementation runs.
const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral"];

/// KV caches grow by at least this many positions at a time.
const CACHE_CHUNK: usize = 256;

/// Prompts are run through the model in pieces of at most this many tokens,
/// which bounds the attention-score memory (`heads × chunk × context`).
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
    attn_norm: Tensor,
    /// Query, key and value projections.
    qkv: Projections,
    wo: Weight,
    ffn_norm: Tensor,
    /// Gate and up projections of the MLP.
    gate_up: Projections,
    w_down: Weight,
}

/// How a model's weight matrices are held in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As the file stores them.
    #[default]
    AsStored,
    /// Expanded to f32 at load: 4 bytes per weight; the fastest matrix multiply on CPU for
    /// batches, and its cost per row falls as the batch grows.
    F32,
    /// Re-quantized to Q8_0 at load (about 1.06 bytes per weight): for files whose own
    /// quantization (Q4_1, Q5_x) has only slow CPU kernels. Matrices whose rows are not a multiple
    /// of 32 stay as stored.
    Q8_0,
}

/// How to load a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The in-memory weight format (see [`WeightFormat`]).
    pub weights: WeightFormat,
}

/// Several projections of the same input. When their weights share a type
/// they are stacked into one matrix at load time, so one quantized matmul
/// (one quantization of the input, one parallel dispatch) computes them all.
enum Projections {
    Fused { matmul: Weight, widths: Vec<usize> },
    Separate(Vec<Weight>),
}

/// A matmul for a weight, in the requested in-memory format.
/// A weight matrix and how it is multiplied: candle's `QMatMul` (f32, or a quantized format
/// with candle's kernels), or Sluice's batched 8-bit kernel ([`super::q8`]), which reads the
/// weights once per call for every row of a batch.
enum Weight {
    Candle(QMatMul),
    Q8 {
        matrix: super::q8::Q8Matrix,
        /// The engine runs one forward pass at a time: the lock is never contended.
        scratch: std::sync::Mutex<super::q8::Q8Scratch>,
    },
}

impl Weight {
    /// `x @ Wᵀ` for `x` of shape `[rows, cols]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Candle(m) => m.forward(x),
            Weight::Q8 { matrix, scratch } => {
                let (n, cols) = x.dims2()?;
                if cols != matrix.cols() {
                    candle_core::bail!("input has {cols} columns, the weight {}", matrix.cols());
                }
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; n * matrix.rows()];
                let mut scratch = scratch
                    .lock()
                    .map_err(|_| candle_core::Error::msg("q8 scratch lock poisoned"))?;
                matrix
                    .matmul(&input, n, &mut out, &mut scratch)
                    .map_err(candle_core::Error::msg)?;
                Tensor::from_vec(out, (n, matrix.rows()), x.device())
            }
        }
    }
}

/// Whether candle's own Q8_0 kernel is the faster one for a matrix of `cols` columns: it packs
/// rows of a multiple of 256 columns for AVX-512 VNNI and multiplies batches with it.
fn candle_q8_is_faster(cols: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cols.is_multiple_of(256) && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = cols;
        false
    }
}

fn weight_matmul(t: QTensor, format: WeightFormat, device: &Device) -> candle_core::Result<Weight> {
    match format {
        WeightFormat::AsStored => QMatMul::from_qtensor(t).map(Weight::Candle),
        WeightFormat::F32 => Ok(Weight::Candle(QMatMul::Tensor(t.dequantize(device)?))),
        WeightFormat::Q8_0 => {
            let (rows, cols) = t.shape().dims2()?;
            if cols % 32 != 0 {
                return QMatMul::from_qtensor(t).map(Weight::Candle);
            }
            let dense = t.dequantize(device)?;
            if candle_q8_is_faster(cols) {
                let q = if t.dtype() == GgmlDType::Q8_0 {
                    t
                } else {
                    QTensor::quantize(&dense, GgmlDType::Q8_0)?
                };
                return QMatMul::from_qtensor(q).map(Weight::Candle);
            }
            let values = dense.flatten_all()?.to_vec1::<f32>()?;
            let matrix = super::q8::Q8Matrix::from_f32(&values, rows, cols)
                .map_err(candle_core::Error::msg)?;
            Ok(Weight::Q8 {
                matrix,
                scratch: std::sync::Mutex::new(super::q8::Q8Scratch::default()),
            })
        }
    }
}

impl Projections {
    fn new(
        parts: Vec<QTensor>,
        device: &Device,
        format: WeightFormat,
    ) -> candle_core::Result<Self> {
        let dtype = parts[0].dtype();
        let k = parts[0].shape().dims2()?.1;
        if parts.len() < 2 || parts.iter().any(|p| p.dtype() != dtype) {
            return Ok(Self::Separate(
                parts
                    .into_iter()
                    .map(|p| weight_matmul(p, format, device))
                    .collect::<candle_core::Result<_>>()?,
            ));
        }
        // Rows are stored one after the other, so stacking the matrices is
        // concatenating their bytes.
        let widths = parts
            .iter()
            .map(|p| p.shape().dims2().map(|d| d.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.storage_size_in_bytes()).sum());
        for p in &parts {
            bytes.extend_from_slice(&p.data()?);
        }
        drop(parts);
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
        let stacked = QTensor::new(storage, (widths.iter().sum::<usize>(), k))?;
        Ok(Self::Fused {
            matmul: weight_matmul(stacked, format, device)?,
            widths,
        })
    }

    /// `x @ W_iᵀ` for every projection, in order.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Separate(ms) => ms.iter().map(|m| m.forward(x)).collect(),
            Self::Fused { matmul, widths } => {
                let y = matmul.forward(x)?;
                let mut out = Vec::with_capacity(widths.len());
                let mut start = 0;
                for &w in widths {
                    out.push(y.narrow(D::Minus1, start, w)?);
                    start += w;
                }
                Ok(out)
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
    device: Device,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Weight,
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
/// copying the whole cache.
pub struct KvCache {
    model_id: u64,
    len: usize,
    capacity: usize,
    max_len: usize,
    n_layer: usize,
    n_kv_head: usize,
    head_dim: usize,
    device: Device,
    /// Per layer `(keys, values)`, each `[n_kv_head, capacity, head_dim]` f32;
    /// empty until the first tokens arrive.
    layers: Vec<(Tensor, Tensor)>,
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
        self.layers.len()
            * 2
            * self.n_kv_head
            * self.capacity
            * self.head_dim
            * DType::F32.size_in_bytes()
    }

    /// Bytes one more position costs once the buffers have grown to hold it.
    pub fn bytes_per_token(&self) -> usize {
        self.n_layer * 2 * self.n_kv_head * self.head_dim * DType::F32.size_in_bytes()
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

    /// Preallocates room for `positions` positions in total (e.g. prompt
    /// plus `max_tokens`), so the buffers do not grow during generation.
    pub fn reserve(&mut self, positions: usize) -> Result<(), LocalError> {
        if positions > self.max_len {
            return Err(LocalError::ContextOverflow {
                needed: positions,
                limit: self.max_len,
            });
        }
        Ok(self.grow_to(positions)?)
    }

    /// Makes room for `needed` positions in total.
    fn grow_to(&mut self, needed: usize) -> candle_core::Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let device = &self.device;
        let grown = self.capacity + CACHE_CHUNK.max(self.capacity / 2);
        let new_cap = needed
            .max(grown)
            .div_ceil(CACHE_CHUNK)
            .saturating_mul(CACHE_CHUNK)
            .min(self.max_len)
            .max(needed);
        let extra = (self.n_kv_head, new_cap - self.len, self.head_dim);
        let fresh = self.layers.is_empty();
        let mut layers = Vec::with_capacity(self.n_layer);
        for l in 0..self.n_layer {
            let (k, v) = if fresh || self.len == 0 {
                let shape = (self.n_kv_head, new_cap, self.head_dim);
                (
                    Tensor::zeros(shape, DType::F32, device)?,
                    Tensor::zeros(shape, DType::F32, device)?,
                )
            } else {
                let (ok, ov) = &self.layers[l];
                let pad = Tensor::zeros(extra, DType::F32, device)?;
                (
                    Tensor::cat(&[&ok.narrow(1, 0, self.len)?, &pad], 1)?,
                    Tensor::cat(&[&ov.narrow(1, 0, self.len)?, &pad], 1)?,
                )
            };
            layers.push((k, v));
        }
        self.layers = layers;
        self.capacity = new_cap;
        Ok(())
    }
}

/// One sequence's part of a forward pass.
struct Segment<'a> {
    cache: &'a mut KvCache,
    tokens: &'a [u32],
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
            Ok::<_, LocalError>(weight_matmul(matrix(reader, name, dims)?, format, &device)?)
        };
        let vector = |reader: &mut BufReader<File>, name: &str| {
            let t = tensor(reader, name)?;
            check(&t, name, &[hidden])?;
            Ok::<_, LocalError>(t.dequantize(&device)?)
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
        let embed = Arc::new(embed);
        let norm = vector(&mut reader, "output_norm.weight")?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            matmul(&mut reader, "output.weight", [vocab, hidden])?
        } else {
            match format {
                WeightFormat::AsStored => Weight::Candle(QMatMul::from_arc(Arc::clone(&embed))?),
                _ => weight_matmul(
                    QTensor::quantize(&embed.dequantize(&device)?, GgmlDType::F32)?,
                    format,
                    &device,
                )?,
            }
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
            .map(|i| i.shape.elem_count() as u64)
            .sum();
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
            device,
            embed,
            layers,
            norm,
            output,
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

    /// A new, empty cache for one sequence. It allocates nothing until the
    /// sequence's first tokens are run.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            model_id: self.id,
            len: 0,
            capacity: 0,
            max_len: self.cfg.context,
            n_layer: self.cfg.n_layer,
            n_kv_head: self.cfg.n_kv_head,
            head_dim: self.cfg.head_dim,
            device: self.device.clone(),
            layers: Vec::new(),
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
        let chunks: Vec<&[u32]> = tokens.chunks(PREFILL_CHUNK).collect();
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut seg = [Segment {
                cache: &mut *cache,
                tokens: chunk,
            }];
            let logits = self.forward(&mut seg, i == last)?;
            if let Some(logits) = logits {
                return Ok(logits.squeeze(0)?.to_vec1::<f32>()?);
            }
        }
        unreachable!("the last chunk returns logits")
    }

    /// One decode step for several sequences in one batched forward pass:
    /// each `(cache, token)` appends `token` to its sequence. The projections
    /// and MLP run on an `[N, hidden]` matrix, so the quantized weights are
    /// read once for all N tokens; rotary embeddings use each sequence's own
    /// position and attention runs per sequence against its own cache.
    /// Returns one logits vector per sequence, in order.
    pub fn decode(&self, batch: &mut [(&mut KvCache, u32)]) -> Result<Vec<Vec<f32>>, LocalError> {
        let mut segs: Vec<Segment<'_>> = batch
            .iter_mut()
            .map(|(cache, token)| Segment {
                cache,
                tokens: std::slice::from_ref(&*token),
            })
            .collect();
        self.forward_checked(&mut segs)
    }

    /// The general step: each `(cache, tokens)` appends one or more tokens to
    /// its sequence, all in one forward pass (e.g. a prompt chunk riding along
    /// with other sequences' decode steps). Returns the logits of each
    /// sequence's last new position, in order. Keep prompt pieces moderate
    /// (say ≤ 512 tokens): their attention scores are materialized.
    pub fn forward_batch(
        &self,
        batch: &mut [(&mut KvCache, &[u32])],
    ) -> Result<Vec<Vec<f32>>, LocalError> {
        let mut segs: Vec<Segment<'_>> = batch
            .iter_mut()
            .map(|(cache, tokens)| Segment { cache, tokens })
            .collect();
        self.forward_checked(&mut segs)
    }

    fn forward_checked(&self, segs: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>, LocalError> {
        if segs.is_empty() {
            return Ok(Vec::new());
        }
        for s in segs.iter() {
            if s.tokens.is_empty() {
                return Err(LocalError::InvalidInput(
                    "every sequence of a batch needs at least one token".into(),
                ));
            }
            self.check_cache(s.cache)?;
            self.check_room(s.cache, s.tokens.len())?;
        }
        let logits = self.forward(segs, true)?.expect("logits were requested");
        Ok(logits.to_vec2::<f32>()?)
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

    /// Runs the segments through the model, appending to their caches.
    /// With `want_logits`, returns `[segments, vocab]` logits of each
    /// segment's last token. The inputs must have been validated.
    fn forward(
        &self,
        segs: &mut [Segment<'_>],
        want_logits: bool,
    ) -> Result<Option<Tensor>, LocalError> {
        let cfg = &self.cfg;
        let dev = &self.device;
        let rows: usize = segs.iter().map(|s| s.tokens.len()).sum();
        let half = cfg.head_dim / 2;

        // Token ids, and the rotary angles of each row's own position.
        let mut ids = Vec::with_capacity(rows);
        let mut cos = Vec::with_capacity(rows * half);
        let mut sin = Vec::with_capacity(rows * half);
        for s in segs.iter() {
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= cfg.vocab {
                    return Err(LocalError::InvalidToken {
                        id: t,
                        vocab_size: cfg.vocab,
                    });
                }
                ids.push(t);
                let pos = (s.cache.len + i) as f32 * cfg.rope_pos_scale;
                for &f in &cfg.rope_inv_freq {
                    let angle = pos * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (rows, 1, half), dev)?;
        let sin = Tensor::from_vec(sin, (rows, 1, half), dev)?;
        let ids = Tensor::from_vec(ids, rows, dev)?;
        let mut x = self.embed.embedding(&ids)?;

        for s in segs.iter_mut() {
            let needed = s.cache.len + s.tokens.len();
            s.cache.grow_to(needed)?;
        }
        // Additive causal masks for segments of more than one token.
        let masks = segs
            .iter()
            .map(|s| {
                let t = s.tokens.len();
                (t > 1)
                    .then(|| causal_mask(t, s.cache.len, dev))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;

        let n_rep = cfg.n_head / cfg.n_kv_head;
        let q_dim = cfg.n_head * cfg.head_dim;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps)?;
            let [q, k, v]: [Tensor; 3] = layer
                .qkv
                .forward(&h)?
                .try_into()
                .expect("three projections");
            let q = q.reshape((rows, cfg.n_head, 1, cfg.head_dim))?;
            let k = k.reshape((rows, cfg.n_kv_head, 1, cfg.head_dim))?;
            let v = v.reshape((rows, cfg.n_kv_head, cfg.head_dim))?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;

            let mut ys = Vec::with_capacity(segs.len());
            let mut row = 0;
            for (s, mask) in segs.iter_mut().zip(&masks) {
                let t = s.tokens.len();
                let past = s.cache.len;
                let total = past + t;
                // [t, heads, 1, d] → [heads, t, d], grouped as [kv_heads, rep * t, d]:
                // query heads sharing a KV head are adjacent.
                let q_s = heads_first(&q.narrow(0, row, t)?, t, cfg.n_head, cfg.head_dim)?
                    .reshape((cfg.n_kv_head, n_rep * t, cfg.head_dim))?;
                let k_s = heads_first(&k.narrow(0, row, t)?, t, cfg.n_kv_head, cfg.head_dim)?;
                let v_s = heads_first(&v.narrow(0, row, t)?, t, cfg.n_kv_head, cfg.head_dim)?;
                let (k_buf, v_buf) = &s.cache.layers[l];
                k_buf.slice_set(&k_s, 1, past)?;
                v_buf.slice_set(&v_s, 1, past)?;
                let keys = k_buf.narrow(1, 0, total)?;
                let values = v_buf.narrow(1, 0, total)?;

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
                    y.reshape((cfg.n_head, t, cfg.head_dim))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .reshape((t, q_dim))?
                };
                ys.push(y);
                row += t;
            }
            let y = if ys.len() == 1 {
                ys.pop().expect("one segment")
            } else {
                Tensor::cat(&ys, 0)?
            };
            x = (x + layer.wo.forward(&y)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.eps)?;
            let [gate, up]: [Tensor; 2] = layer
                .gate_up
                .forward(&h)?
                .try_into()
                .expect("two projections");
            let mlp = layer
                .w_down
                .forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (x + mlp)?;
        }
        for s in segs.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        if !want_logits {
            return Ok(None);
        }

        let last = if rows == segs.len() {
            x
        } else if segs.len() == 1 {
            x.narrow(0, rows - 1, 1)?
        } else {
            let mut idx = Vec::with_capacity(segs.len());
            let mut end = 0u32;
            for s in segs.iter() {
                end += s.tokens.len() as u32;
                idx.push(end - 1);
            }
            x.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?
        };
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.eps)?;
        let logits = self.output.forward(&last)?;
        debug_assert_eq!(logits.dim(D::Minus1)?, cfg.vocab);
        Ok(Some(logits))
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
        let n = info.shape.elem_count() as u64;
        match counts.iter_mut().find(|(t, _)| *t == info.ggml_dtype) {
            Some(c) => c.1 += n,
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
        send_sync::<GgufTokenizer>();
        send_sync::<ChatTemplate>();
    }
}
