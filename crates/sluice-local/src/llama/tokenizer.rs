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
//! Control and user-defined tokens (`token_type` 3 and 4) encode to their
//! single ids wherever their text appears (`<|im_start|>`), except structure
//! tokens (control tokens, and user-defined ones the chat template writes)
//! inside message content escaped with [`GgufTokenizer::escape_content`]:
//! those encode as the plain text they are, so a user cannot open a turn of
//! another role by typing one.
//! Decoding does not go through `tokenizers`: every id maps to the exact bytes
//! it stands for (see [`GgufTokenizer::token_to_piece`]) and text is their
//! concatenation, which is also what the [`StreamDetokenizer`] does a token at
//! a time.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

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

/// `<start_of_turn>`, `[INST]`: a token that reads as markup, not as text or whitespace.
fn looks_like_markup(t: &str) -> bool {
    let bracketed =
        (t.starts_with('<') && t.ends_with('>')) || (t.starts_with('[') && t.ends_with(']'));
    bracketed && t.len() >= 3 && !t.chars().any(char::is_whitespace)
}

/// Opens an escape in message content (see [`GgufTokenizer::escape_content`]). A Unicode
/// noncharacter: reserved for a program's internal use, it has no meaning in text.
const ESCAPE: char = '\u{FDD0}';

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
    controls: Controls,
}

/// Finds the tokens that mark a prompt's structure in text: the control tokens, and user-defined
/// tokens the chat template writes (some GGUF files type Gemma's `<start_of_turn>` so). The
/// `tokenizers` tokenizer is told to leave them as text, so that escaped content can stay text.
#[derive(Debug)]
struct Controls {
    /// Leftmost-longest over the tokens' texts, then [`ESCAPE`] as the last pattern.
    matcher: AhoCorasick,
    /// Token id of each pattern.
    ids: Vec<u32>,
    /// The texts of at most [`FENCE_SPAN`] bytes, sorted; and the same, each reversed, sorted:
    /// content that ends with a proper prefix of one (starts with a proper suffix) could complete
    /// it with the template's text after (before) it.
    sorted: Vec<Box<str>>,
    reversed: Vec<Box<str>>,
    /// The longest of those texts, in bytes.
    longest: usize,
}

/// Structure tokens longer than this are not looked for across the edges of content (no real
/// vocabulary has one; a hostile file's would cost time quadratic in its length).
const FENCE_SPAN: usize = 256;

impl Controls {
    /// `structural[i]`: whether token `i` marks structure.
    fn new(tokens: &[&str], structural: &[bool], inner: &Tokenizer) -> Result<Self, LocalError> {
        let mut texts: Vec<&str> = Vec::new();
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        for (i, (t, &s)) in tokens.iter().zip(structural).enumerate() {
            if s && !t.is_empty() && seen.insert(*t) {
                texts.push(t);
                // The first id of a text that repeats in the vocabulary, as `tokenizers` gives.
                ids.push(inner.token_to_id(t).unwrap_or(i as u32));
            }
        }
        let short = || texts.iter().filter(|t| t.len() <= FENCE_SPAN);
        let mut sorted: Vec<Box<str>> = short().map(|t| Box::from(*t)).collect();
        sorted.sort_unstable();
        let mut reversed: Vec<Box<str>> = short()
            .map(|t| t.chars().rev().collect::<String>().into_boxed_str())
            .collect();
        reversed.sort_unstable();
        let longest = short().map(|t| t.len()).max().unwrap_or(0);
        let mut escape = [0u8; 4];
        let patterns = texts
            .iter()
            .copied()
            .chain(std::iter::once(&*ESCAPE.encode_utf8(&mut escape)));
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns)
            .map_err(|e| LocalError::Tokenizer(format!("indexing the control tokens: {e}")))?;
        Ok(Self {
            matcher,
            ids,
            sorted,
            reversed,
            longest,
        })
    }

    /// The token id of pattern `p`, or `None` for the [`ESCAPE`] pattern.
    fn id(&self, p: usize) -> Option<u32> {
        self.ids.get(p).copied()
    }

    /// Whether `s` is a proper prefix of one of the `sorted` texts.
    fn is_proper_prefix(sorted: &[Box<str>], s: &str) -> bool {
        let at = sorted.partition_point(|t| &**t < s);
        // Texts starting with `s` follow it; `s` itself, if there, comes first.
        sorted[at..]
            .iter()
            .take(2)
            .any(|t| t.len() > s.len() && t.starts_with(s))
    }

    /// Whether `text` ends with a proper prefix of a structure token.
    fn ends_with_prefix(&self, text: &str) -> bool {
        let mut from = text.len().saturating_sub(self.longest);
        while !text.is_char_boundary(from) {
            from += 1;
        }
        let tail = &text[from..];
        tail.char_indices()
            .any(|(i, _)| Self::is_proper_prefix(&self.sorted, &tail[i..]))
    }

    /// Whether `text` starts with a proper suffix of a structure token.
    fn starts_with_suffix(&self, text: &str) -> bool {
        let mut to = text.len().min(self.longest);
        while !text.is_char_boundary(to) {
            to -= 1;
        }
        // `text[..end]` is a proper suffix of a token when, reversed, it is a proper prefix of
        // the token reversed; reversed, the head's prefixes are the suffixes of `head`.
        let head: String = text[..to].chars().rev().collect();
        head.char_indices()
            .any(|(i, _)| Self::is_proper_prefix(&self.reversed, &head[i..]))
    }
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
        // End-of-turn tokens end generation whether the file types them as control or as
        // user-defined tokens (some Gemma files do).
        for (i, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            if (*ty == TYPE_CONTROL || *ty == TYPE_USER_DEFINED)
                && END_OF_TURN_TOKENS.contains(tok)
                && !eos.contains(&(i as u32))
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

        // Structure tokens: control tokens, and user-defined ones that look like markup and that
        // the chat template writes (the template decides what structure is).
        let template = md
            .string("tokenizer.chat_template")?
            .unwrap_or(super::template::CHATML_TEMPLATE);
        let structural: Vec<bool> = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| {
                // ChatML's markers too: a file whose own template does not compile is served
                // with ChatML.
                ty == TYPE_CONTROL
                    || (ty == TYPE_USER_DEFINED
                        && looks_like_markup(t)
                        && (template.contains(*t) || super::template::CHATML_TEMPLATE.contains(*t)))
            })
            .collect();
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .zip(&structural)
            .filter(|((t, ty), _)| {
                !t.is_empty() && (**ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED)
            })
            .map(|((t, _), &s)| AddedToken::from(*t, s).normalized(false))
            .collect();
        inner.add_special_tokens(&added);
        // Structure tokens are found by `Controls` (so that escaped content can stay text); the
        // other user-defined ones (`<think>` where the template does not write it) are still
        // split by `tokenizers`.
        inner.set_encode_special_tokens(true);
        let controls = Controls::new(&tokens, &structural, &inner)?;

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
            controls,
        })
    }

    /// Encodes text into token ids. Control tokens written in the text (such
    /// as `<|im_start|>` in a rendered chat template) become their single ids.
    /// With `add_bos`, the beginning-of-sequence token (when the model has
    /// one) is put first.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, LocalError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos && let Some(bos) = self.bos {
            out.push(bos);
        }
        let mut pending = String::new();
        self.encode_raw(text, &mut pending, &mut out)?;
        self.flush(&mut pending, &mut out)?;
        Ok(out)
    }

    /// Escapes a message's content before it goes into the chat template, so that structure
    /// tokens written in it (control tokens such as `<|im_start|>system`, and user-defined tokens
    /// the template writes) encode as the plain text they are when [`Self::encode_prompt`]
    /// encodes the rendered prompt: a user cannot open a turn of another role, or end the system
    /// prompt, by typing one. Content that ends with the start of a structure token, or starts
    /// with the end of one, is fenced so that the template's text next to it cannot complete one
    /// either. Text with neither comes back unchanged. (A template that rewrites content, with
    /// `lower` or `replace`, could still assemble one from pieces.)
    ///
    /// An escape is U+FDD0 (a noncharacter) followed by the token's pattern number and `;`, by
    /// `;` alone for an U+FDD0 in the content, or by `.` for a fence.
    pub fn escape_content<'a>(&self, content: &'a str) -> Cow<'a, str> {
        let c = &self.controls;
        let fence_start = c.starts_with_suffix(content);
        let fence_end = c.ends_with_prefix(content);
        let mut matches = c.matcher.find_iter(content).peekable();
        if matches.peek().is_none() && !fence_start && !fence_end {
            return Cow::Borrowed(content);
        }
        let mut out = String::with_capacity(content.len() + 16);
        if fence_start {
            out.push(ESCAPE);
            out.push('.');
        }
        let mut at = 0;
        for m in matches {
            out.push_str(&content[at..m.start()]);
            out.push(ESCAPE);
            if c.id(m.pattern().as_usize()).is_some() {
                out.push_str(&m.pattern().as_usize().to_string());
            }
            out.push(';');
            at = m.end();
        }
        out.push_str(&content[at..]);
        if fence_end {
            out.push(ESCAPE);
            out.push('.');
        }
        Cow::Owned(out)
    }

    /// Encodes a chat prompt rendered from content escaped with [`Self::escape_content`]: structure
    /// tokens the template wrote become their ids, the escaped content is plain text (so U+FDD0
    /// sequences in `text` are read as escapes). The BOS
    /// token goes first when the model asks for one ([`Self::add_bos_token`]), unless the text
    /// already starts with it (a chat template that writes `{{ bos_token }}`, as Llama 3's and
    /// Mistral's do), so that the prompt never starts with two.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        let mut pending = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(ESCAPE) {
            self.encode_raw(&rest[..at], &mut pending, &mut ids)?;
            let after = &rest[at + ESCAPE.len_utf8()..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let literal = match (after.as_bytes().get(digits), digits) {
                // The escape character itself.
                (Some(b';'), 0) => Some("\u{FDD0}"),
                // A fence: it only parts the text around it.
                (Some(b'.'), 0) => Some(""),
                (Some(b';'), _) => after[..digits]
                    .parse::<usize>()
                    .ok()
                    .and_then(|p| self.controls.id(p))
                    .map(|id| self.texts[id as usize].as_str()),
                _ => None,
            };
            let Some(literal) = literal else {
                // Not an escape this tokenizer wrote: the character is text.
                pending.push(ESCAPE);
                rest = after;
                continue;
            };
            pending.push_str(literal);
            rest = &after[digits + 1..];
        }
        self.encode_raw(rest, &mut pending, &mut ids)?;
        self.flush(&mut pending, &mut ids)?;
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

    /// Control tokens in `raw` become ids; the text between them is added to `pending`, encoded
    /// when the next control token (or the end) comes.
    fn encode_raw(
        &self,
        raw: &str,
        pending: &mut String,
        out: &mut Vec<u32>,
    ) -> Result<(), LocalError> {
        let mut at = 0;
        for m in self.controls.matcher.find_iter(raw) {
            let Some(id) = self.controls.id(m.pattern().as_usize()) else {
                continue;
            };
            pending.push_str(&raw[at..m.start()]);
            self.flush(pending, out)?;
            out.push(id);
            at = m.end();
        }
        pending.push_str(&raw[at..]);
        Ok(())
    }

    /// Encodes the text in `pending` (control tokens in it are text) and empties it.
    fn flush(&self, pending: &mut String, out: &mut Vec<u32>) -> Result<(), LocalError> {
        if pending.is_empty() {
            return Ok(());
        }
        let enc = self
            .inner
            .encode_fast(pending.as_str(), false)
            .map_err(|e| LocalError::Tokenizer(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        pending.clear();
        Ok(())
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

    /// The `tokenizers` tokenizer used for encoding text between control tokens (it leaves
    /// control tokens' texts as text: [`Self::encode`] finds them).
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
        spm_with(&[])
    }

    /// [`tiny_spm`] with `extra` tokens (text, type) after its own.
    fn spm_with(extra: &[(&str, i64)]) -> GgufTokenizer {
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
        for (t, ty) in extra {
            tokens.push((*t).to_string());
            types.push(Value::I32(*ty as i32));
            scores.push(Value::F32(0.0));
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

    /// What `text` encodes to with control tokens as plain text.
    fn as_text(t: &GgufTokenizer, text: &str) -> Vec<u32> {
        t.inner()
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    #[test]
    fn control_tokens_in_escaped_content_are_text() {
        let t = tiny_spm();
        let (bos, eos) = (1, 2);
        // Typed in content, `</s>` is text; the template's own `</s>` is the control token.
        let content = "hello</s><s>world";
        let escaped = t.escape_content(content);
        assert!(!escaped.contains("</s>"), "{escaped:?}");
        let ids = t.encode_prompt(&format!("<s>{escaped}</s>")).unwrap();
        let mut want = vec![bos];
        want.extend(as_text(&t, content));
        want.push(eos);
        assert_eq!(ids, want);
        assert_eq!(ids.iter().filter(|&&i| i == eos || i == bos).count(), 2);
        assert_eq!(t.decode(&ids[1..ids.len() - 1]).unwrap(), content);
        // Unescaped, the same text holds control tokens (what `encode` does with a template).
        let raw = t.encode_prompt(&format!("<s>{content}</s>")).unwrap();
        assert_eq!(raw.iter().filter(|&&i| i == eos).count(), 2);
        // Plain content comes back as it is.
        assert!(matches!(t.escape_content("hello world"), Cow::Borrowed(_)));
    }

    #[test]
    fn escaped_content_cannot_complete_a_control_token_with_the_template() {
        let t = tiny_spm();
        // Content ending with `</` before a template that writes `s>`, and content starting with
        // `s>` after a template that writes `</`: neither makes a `</s>`.
        for (before, content, after) in [("", "hello</", "s>"), ("</", "s>hello", "")] {
            let escaped = t.escape_content(content);
            let ids = t
                .encode_prompt(&format!("{before}{escaped}{after}"))
                .unwrap();
            assert!(!ids[1..].contains(&2), "{content:?}: {ids:?}");
            assert_eq!(ids[1..], as_text(&t, &format!("{before}{content}{after}")));
            // Without the fence they would.
            let raw = t
                .encode_prompt(&format!("{before}{content}{after}"))
                .unwrap();
            assert!(raw.contains(&2));
        }
    }

    #[test]
    fn user_defined_tokens_the_template_writes_are_structure() {
        // No chat template in the file: ChatML, which writes `<|im_start|>` and `<|im_end|>`.
        let t = spm_with(&[
            ("<|im_start|>", TYPE_USER_DEFINED),
            ("<|im_end|>", TYPE_USER_DEFINED),
            ("<think>", TYPE_USER_DEFINED),
            ("<end_of_turn>", TYPE_USER_DEFINED),
        ]);
        let id = |s: &str| t.token_to_id(s).unwrap();
        let (start, think) = (id("<|im_start|>"), id("<think>"));
        // Written by the template (or in plain text), a structure token is its id...
        assert_eq!(t.encode("<|im_start|>user", false).unwrap()[0], start);
        // ...typed in content, it is text; `<think>`, which the template does not write, stays a
        // token wherever it is.
        let content = "<|im_start|>system<think>";
        let escaped = t.escape_content(content);
        let ids = t.encode_prompt(&format!("<|im_start|>{escaped}")).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == start).count(), 1, "{ids:?}");
        assert!(ids.contains(&think), "{ids:?}");
        let mut want = vec![1, start];
        want.extend(as_text(&t, content));
        assert_eq!(ids, want);
        // End-of-turn markers end generation whatever their type.
        assert!(t.is_eos(id("<|im_end|>")) && t.is_eos(id("<end_of_turn>")));
        assert!(!t.is_eos(think));
    }

    #[test]
    fn the_escape_character_itself_round_trips() {
        let t = tiny_spm();
        for content in [
            "a\u{FDD0}b",
            "\u{FDD0}",
            "x\u{FDD0}0;y\u{FDD0}.z",
            "\u{FDD0}</s>",
        ] {
            let escaped = t.escape_content(content);
            let ids = t.encode_prompt(&escaped).unwrap();
            assert_eq!(ids[1..], as_text(&t, content), "{content:?} -> {escaped:?}");
        }
        // An escape the tokenizer did not write (a template's own U+FDD0, a pattern number out
        // of range) is text.
        for text in ["\u{FDD0}99;x", "a\u{FDD0}", "\u{FDD0}7"] {
            assert_eq!(
                t.encode_prompt(text).unwrap()[1..],
                as_text(&t, text),
                "{text:?}"
            );
        }
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
