//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata,
//! built with the `tokenizers` crate, and an incremental detokenizer for
//! streaming.
//!
//! Two GGUF tokenizer models are supported:
//! * `gpt2`: byte-level BPE from `tokens` + `merges`, with the pre-tokenizer
//!   chosen by `tokenizer.ggml.pre` (GPT-2, Llama 3, Qwen 2, StarCoder /
//!   SmolLM digit splitting);
//! * `llama`: SentencePiece BPE from `tokens` + `scores` (merges derived from
//!   the scores), `▁` for spaces and `<0xNN>` byte fallback.
//!
//! Control and user-defined tokens (`token_type` 3 and 4) are registered as
//! added tokens, so text such as `<|im_start|>` encodes to its single id.
//! Decoding does not go through `tokenizers`: every id maps to the exact bytes
//! it stands for (see [`GgufTokenizer::token_to_piece`]) and text is their
//! concatenation, which is also what the [`StreamDetokenizer`] does a token at
//! a time.

use std::collections::HashMap;
use std::sync::Arc;

#[cfg(test)]
use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::LocalError;
use super::gguf::Metadata;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// Control tokens that end a turn in common chat formats; llama.cpp stops on
/// them too, besides the declared end-of-sequence token.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|END_OF_TURN_TOKEN|>",
    "</s>",
];

/// Llama 3's pre-tokenizer split (numbers in groups of up to three digits).
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's pre-tokenizer split (single digits).
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Which family of tokenizer the GGUF describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// GPT-2 style byte-level BPE.
    ByteLevel,
    /// SentencePiece BPE with byte fallback.
    SentencePiece { add_space_prefix: bool },
}

/// The bytes every token id stands for, shared with stream detokenizers.
#[derive(Debug)]
struct Pieces {
    bytes: Vec<Box<[u8]>>,
    control: Vec<bool>,
    /// SentencePiece with a space prefix: decoded text drops one leading space.
    strip_leading_space: bool,
}

/// A tokenizer built from GGUF metadata. `Send + Sync`; encode and decode take
/// `&self`.
pub struct GgufTokenizer {
    inner: Tokenizer,
    kind: Kind,
    pieces: Arc<Pieces>,
    texts: Vec<String>,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub(crate) fn from_metadata(md: Metadata<'_>) -> Result<Self, LocalError> {
        let model = md.string("tokenizer.ggml.model")?.ok_or_else(|| {
            LocalError::InvalidModel("GGUF metadata lacks tokenizer.ggml.model".into())
        })?;
        let tokens = md.string_array("tokenizer.ggml.tokens")?.ok_or_else(|| {
            LocalError::InvalidModel("GGUF metadata lacks tokenizer.ggml.tokens".into())
        })?;
        if tokens.is_empty() {
            return Err(LocalError::InvalidModel("the vocabulary is empty".into()));
        }
        let types = match md.i64_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t,
            Some(t) => {
                return Err(LocalError::InvalidModel(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        let id = |key: &str| -> Result<Option<u32>, LocalError> {
            Ok(md.u32(key)?.filter(|&i| (i as usize) < tokens.len()))
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let mut eos: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(i) = id(key)?
                && !eos.contains(&i)
            {
                eos.push(i);
            }
        }
        for (i, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TYPE_CONTROL && END_OF_TURN_TOKENS.contains(tok) && !eos.contains(&(i as u32))
            {
                eos.push(i as u32);
            }
        }

        let kind = match model {
            "gpt2" => Kind::ByteLevel,
            "llama" => Kind::SentencePiece {
                add_space_prefix: md.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
            },
            other => {
                return Err(LocalError::InvalidModel(format!(
                    "unsupported tokenizer model {other:?} (supported: gpt2, llama)"
                )));
            }
        };
        let add_bos = md
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(matches!(kind, Kind::SentencePiece { .. }));

        // First id wins when a token string repeats (some vocabularies pad
        // with duplicates); the duplicates stay decodable through `pieces`.
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry((*t).to_string()).or_insert(i as u32);
        }

        let mut inner = match kind {
            Kind::ByteLevel => {
                let merges = md.string_array("tokenizer.ggml.merges")?.ok_or_else(|| {
                    LocalError::InvalidModel("GGUF metadata lacks tokenizer.ggml.merges".into())
                })?;
                let merges = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| {
                                LocalError::InvalidModel(format!("malformed BPE merge {m:?}"))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let pre = md.string("tokenizer.ggml.pre")?.unwrap_or("default");
                let pre = byte_level_pre_tokenizer(pre)?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(pre.ignore_merges)
                    .build()
                    .map_err(|e| LocalError::Tokenizer(format!("building the BPE model: {e}")))?;
                let mut t = Tokenizer::new(bpe);
                if pre.nfc {
                    t.with_normalizer(Some(NFC));
                }
                t.with_pre_tokenizer(Some(pre.pre_tokenizer));
                t.with_decoder(Some(ByteLevel::default()));
                t
            }
            Kind::SentencePiece { add_space_prefix } => {
                let scores = md
                    .f32_array("tokenizer.ggml.scores")?
                    .filter(|s| s.len() == tokens.len());
                let merges = sentencepiece_merges(&tokens, &types, scores.as_deref(), &vocab);
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = types.iter().position(|&t| t == TYPE_UNKNOWN) {
                    builder = builder.unk_token(tokens[unk].to_string());
                }
                let bpe = builder
                    .build()
                    .map_err(|e| LocalError::Tokenizer(format!("building the BPE model: {e}")))?;
                let mut t = Tokenizer::new(bpe);
                let scheme = if add_space_prefix {
                    PrependScheme::Always
                } else {
                    PrependScheme::Never
                };
                t.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
                t
            }
        };

        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| !t.is_empty() && (**ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED))
            .map(|(t, ty)| AddedToken::from(*t, *ty == TYPE_CONTROL).normalized(false))
            .collect();
        inner.add_special_tokens(&added);

        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| piece_bytes(kind, t, ty))
            .collect();
        let control = types.iter().map(|&t| t == TYPE_CONTROL).collect();
        let pieces = Pieces {
            bytes,
            control,
            strip_leading_space: matches!(
                kind,
                Kind::SentencePiece {
                    add_space_prefix: true
                }
            ),
        };
        Ok(Self {
            inner,
            kind,
            pieces: Arc::new(pieces),
            texts: tokens.iter().map(|t| (*t).to_string()).collect(),
            bos,
            eos,
            add_bos,
        })
    }

    /// Encodes text into token ids. Control tokens written in the text (such
    /// as `<|im_start|>` in a rendered chat template) become their single ids.
    /// With `add_bos`, the beginning-of-sequence token (when the model has
    /// one) is put first.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, LocalError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| LocalError::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_bos && let Some(bos) = self.bos {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Encodes a rendered chat prompt as the model expects it: with the BOS token first when the
    /// model asks for one ([`Self::add_bos_token`]), unless the text already starts with it (a
    /// chat template that writes `{{ bos_token }}`, as Llama 3's and Mistral's do), so that the
    /// prompt never starts with two.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        let mut ids = self.encode(text, self.add_bos)?;
        if self.add_bos
            && let Some(bos) = self.bos
            && ids.len() >= 2
            && ids[0] == bos
            && ids[1] == bos
        {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// Decodes token ids into text, special tokens included. Byte sequences
    /// that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LocalError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece_or_err(id)?);
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.pieces.strip_leading_space && text.starts_with(' ') {
            text.remove(0);
        }
        Ok(text)
    }

    /// The exact bytes token `id` stands for (not necessarily valid UTF-8 on
    /// its own: byte-level BPE splits multibyte characters across tokens).
    /// `None` for an id outside the vocabulary.
    pub fn token_to_piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.bytes.get(id as usize).map(|b| &b[..])
    }

    /// The vocabulary entry of token `id` as stored in the GGUF (`Ġ`-encoded
    /// for byte-level BPE, `▁` for SentencePiece).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary entry (as stored in the GGUF).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<s>`, ...).
    pub fn is_control(&self, id: u32) -> bool {
        self.pieces
            .control
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// Tokens that end generation: the declared end-of-sequence token first,
    /// then end-of-turn tokens (`tokenizer.ggml.eot_token_id`, and control
    /// tokens such as `<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether `id` ends generation (see [`Self::eos_token_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// The beginning-of-sequence token, if the model declares one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether the model expects a BOS token in front of a prompt
    /// (`tokenizer.ggml.add_bos_token`; defaults to true for SentencePiece).
    /// Chat templates that write `{{ bos_token }}` already include it.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// A detokenizer for one stream of generated tokens.
    pub fn stream_detokenizer(&self) -> StreamDetokenizer {
        StreamDetokenizer {
            pieces: Arc::clone(&self.pieces),
            pending: Vec::new(),
            started: false,
            skip_control: false,
        }
    }

    /// The `tokenizers` tokenizer used for encoding.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    fn piece_or_err(&self, id: u32) -> Result<&[u8], LocalError> {
        self.token_to_piece(id).ok_or(LocalError::InvalidToken {
            id,
            vocab_size: self.texts.len(),
        })
    }
}

/// Turns generated token ids into text incrementally. Byte-level BPE can split
/// one character (`é`, `你`, `🙂`) across several tokens: [`Self::push`]
/// holds such bytes back until the character is complete, so every string it
/// yields is whole UTF-8 and the concatenation of all yields plus
/// [`Self::finish`] equals [`GgufTokenizer::decode`] of all the ids.
#[derive(Debug, Clone)]
pub struct StreamDetokenizer {
    pieces: Arc<Pieces>,
    pending: Vec<u8>,
    started: bool,
    skip_control: bool,
}

impl StreamDetokenizer {
    /// With `true`, control tokens (`<|im_end|>`, ...) produce no text.
    pub fn skip_control_tokens(mut self, skip: bool) -> Self {
        self.skip_control = skip;
        self
    }

    /// Adds one token; returns the text that became complete, if any. Ids
    /// outside the vocabulary are ignored.
    pub fn push(&mut self, id: u32) -> Option<String> {
        let i = id as usize;
        let piece = self.pieces.bytes.get(i)?;
        if self.skip_control && self.pieces.control[i] {
            return None;
        }
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Invalid bytes in the middle: replace them, go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for more.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        self.emit(out)
    }

    /// Flushes what is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.emit(rest).unwrap_or_default()
    }

    fn emit(&mut self, mut text: String) -> Option<String> {
        if text.is_empty() {
            return None;
        }
        if !self.started {
            self.started = true;
            if self.pieces.strip_leading_space && text.starts_with(' ') {
                text.remove(0);
                if text.is_empty() {
                    return None;
                }
            }
        }
        Some(text)
    }
}

/// How a byte-level BPE vocabulary splits text before BPE.
struct PreTokenization {
    pre_tokenizer: PreTokenizerWrapper,
    /// Whole words found in the vocabulary skip the merges (Llama 3).
    ignore_merges: bool,
    /// Text is NFC-normalized first (Qwen 2).
    nfc: bool,
}

/// The pre-tokenization for a byte-level BPE vocabulary named by
/// `tokenizer.ggml.pre`.
fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenization, LocalError> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, LocalError> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| LocalError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let plain = |pre_tokenizer: PreTokenizerWrapper| PreTokenization {
        pre_tokenizer,
        ignore_merges: false,
        nfc: false,
    };
    Ok(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => PreTokenization {
            ignore_merges: true,
            ..plain(split(LLAMA3_PATTERN)?)
        },
        "qwen2" | "deepseek-r1-qwen" | "megrez" => PreTokenization {
            nfc: true,
            ..plain(split(QWEN2_PATTERN)?)
        },
        // Every digit on its own, then GPT-2's split.
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva" => {
            plain(
                Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])
                .into(),
            )
        }
        "default" | "gpt2" | "gpt-2" | "phi-2" | "olmo" | "mpt" | "roberta-bpe" => {
            plain(ByteLevel::new(false, true, true).into())
        }
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre, using the GPT-2 pre-tokenizer"
            );
            plain(ByteLevel::new(false, true, true).into())
        }
    })
}

/// The longest token (in bytes) that gets merges: each split of a token hashes
/// both halves, so one huge token in a hostile file would cost quadratic time
/// at load. Real pieces are a few dozen bytes at most.
const MAX_MERGED_TOKEN_BYTES: usize = 1024;

/// BPE merges for a SentencePiece vocabulary: every way of writing a normal
/// token as the concatenation of two vocabulary entries, ranked by the
/// token's score (higher first), as SentencePiece's BPE applies them. Tokens
/// over [`MAX_MERGED_TOKEN_BYTES`] get none.
fn sentencepiece_merges(
    tokens: &[&str],
    types: &[i64],
    scores: Option<&[f32]>,
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(types).enumerate() {
        if (ty != TYPE_NORMAL && ty != TYPE_USER_DEFINED) || tok.len() > MAX_MERGED_TOKEN_BYTES {
            continue;
        }
        let score = scores.map_or(-(id as f32), |s| s[id]);
        for (split, _) in tok.char_indices().skip(1) {
            let (a, b) = tok.split_at(split);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                ranked.push((score, id as u32, ia, ib));
            }
        }
    }
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
            .then(x.3.cmp(&y.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, a, b)| {
            (
                tokens[a as usize].to_string(),
                tokens[b as usize].to_string(),
            )
        })
        .collect()
}

/// The bytes a vocabulary entry stands for.
fn piece_bytes(kind: Kind, token: &str, ty: i64) -> Box<[u8]> {
    if ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED || ty == TYPE_UNKNOWN {
        return token.as_bytes().into();
    }
    match kind {
        Kind::ByteLevel => {
            let map = unicode_to_byte();
            let mut out = Vec::with_capacity(token.len());
            for c in token.chars() {
                match map.get(&c) {
                    Some(&b) => out.push(b),
                    None => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            out.into()
        }
        Kind::SentencePiece { .. } => {
            if ty == TYPE_BYTE
                && let Some(hex) = token.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                return vec![b].into();
            }
            token.replace('▁', " ").into_bytes().into()
        }
    }
}

/// The inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for
/// themselves, the others were shifted to code points 256 and up.
fn unicode_to_byte() -> &'static HashMap<char, u8> {
    static MAP: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = HashMap::with_capacity(256);
        let mut shifted = 0u32;
        for b in 0u32..=255 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            map.insert(char::from_u32(c).expect("valid code point"), b as u8);
        }
        map
    })
}

/// Builds a tokenizer from literal metadata (for tests of the SentencePiece
/// path, which the bundled test model does not use).
#[cfg(test)]
fn from_values(values: Vec<(&str, Value)>) -> Result<GgufTokenizer, LocalError> {
    let map: HashMap<String, Value> = values
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    GgufTokenizer::from_metadata(Metadata::new(&map))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let map = unicode_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    /// A tiny SentencePiece vocabulary: `<unk> <s> </s>`, the 256 byte
    /// tokens, then a few pieces with scores.
    pub(crate) fn tiny_spm() -> GgufTokenizer {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![
            Value::I32(TYPE_UNKNOWN as i32),
            Value::I32(TYPE_CONTROL as i32),
            Value::I32(TYPE_CONTROL as i32),
        ];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(Value::I32(TYPE_BYTE as i32));
        }
        let words = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁h", "▁he", "llo", "▁hello", "▁w",
            "or", "▁wor", "ld", "▁world",
        ];
        let mut scores: Vec<Value> = tokens.iter().map(|_| Value::F32(0.0)).collect();
        for (i, w) in words.iter().enumerate() {
            tokens.push((*w).to_string());
            types.push(Value::I32(TYPE_NORMAL as i32));
            scores.push(Value::F32(-(i as f32)));
        }
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        from_values(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ])
        .unwrap()
    }

    #[test]
    fn sentencepiece_encodes_with_merges_and_byte_fallback() {
        let t = tiny_spm();
        assert!(t.add_bos_token());
        let ids = t.encode("hello world", true).unwrap();
        let toks: Vec<&str> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(toks, ["<s>", "▁hello", "▁world"]);
        assert_eq!(t.decode(&ids[1..]).unwrap(), "hello world");
        // Characters outside the vocabulary fall back to their UTF-8 bytes.
        let ids = t.encode("hé", false).unwrap();
        let toks: Vec<&str> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(toks, ["▁h", "<0xC3>", "<0xA9>"]);
        assert_eq!(t.decode(&ids).unwrap(), "hé");
        // Control tokens in the text encode to their ids.
        let ids = t.encode("hello</s>", false).unwrap();
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(t.eos_token_ids(), &[2]);
        // Streaming strips the leading space once, like decode.
        let mut s = t.stream_detokenizer();
        let ids = t.encode("hello world", false).unwrap();
        let text: String = ids.iter().filter_map(|&i| s.push(i)).collect();
        assert_eq!(text + &s.finish(), "hello world");
    }

    #[test]
    fn a_huge_token_gets_no_merges() {
        let half = "a".repeat(MAX_MERGED_TOKEN_BYTES / 2 + 1);
        let whole = half.repeat(2);
        let fits = "a".repeat(MAX_MERGED_TOKEN_BYTES);
        let small = "a".repeat(MAX_MERGED_TOKEN_BYTES / 2);
        let tokens = [half.as_str(), whole.as_str(), small.as_str(), fits.as_str()];
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_string(), i as u32))
            .collect();
        let types = [TYPE_NORMAL; 4];
        let merges = sentencepiece_merges(&tokens, &types, None, &vocab);
        // `fits` is small + small; `whole` (over the limit) is half + half, and gets nothing.
        assert_eq!(merges, vec![(small.clone(), small)]);
    }

    #[test]
    fn a_prompt_gets_one_bos_whether_or_not_the_template_wrote_it() {
        let t = tiny_spm();
        let bos = t.bos_token_id().unwrap();
        let ids = t.encode_prompt("hello").unwrap();
        assert_eq!(ids[0], bos);
        assert_ne!(ids[1], bos);
        // `{{ bos_token }}hello`: the template's BOS is the one.
        let from_template = t.encode_prompt("<s>hello").unwrap();
        assert_eq!(from_template, ids);
        // A model that wants none gets none added.
        let mut none = tiny_spm();
        none.add_bos = false;
        assert_ne!(none.encode_prompt("hello").unwrap()[0], bos);
        assert_eq!(none.encode_prompt("<s>hello").unwrap(), ids);
    }

    #[test]
    fn stream_detokenizer_waits_for_whole_characters() {
        let t = tiny_spm();
        let byte = |b: u8| t.token_to_id(&format!("<0x{b:02X}>")).unwrap();
        let mut s = t.stream_detokenizer();
        // 🙂 is F0 9F 99 82.
        assert_eq!(s.push(byte(0xF0)), None);
        assert_eq!(s.push(byte(0x9F)), None);
        assert_eq!(s.push(byte(0x99)), None);
        assert_eq!(s.push(byte(0x82)).as_deref(), Some("🙂"));
        // A broken sequence is replaced, not held forever.
        assert_eq!(s.push(byte(0xC3)), None);
        assert_eq!(s.push(byte(b'a')).as_deref(), Some("\u{FFFD}a"));
        // An unfinished character at the end comes out of finish().
        assert_eq!(s.push(byte(0xE4)), None);
        assert_eq!(s.finish(), "\u{FFFD}");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn unsupported_tokenizer_model_is_an_error() {
        let err = from_values(vec![
            ("tokenizer.ggml.model", Value::String("bert".into())),
            ("tokenizer.ggml.tokens", strings(&["[CLS]"])),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("unsupported tokenizer model"),
            "{err}"
        );
    }
}
