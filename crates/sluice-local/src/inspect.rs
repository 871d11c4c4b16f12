//! Reading what a model file is without loading it: the quantization of a GGUF file from its
//! metadata, for `sluice models list`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

/// The quantization of a GGUF file: `general.file_type` when present (llama.cpp's numbering),
/// else the most common tensor type.
pub fn gguf_quantization(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| format!("not a GGUF file: {e}"))?;
    if let Some(ft) = content
        .metadata
        .get("general.file_type")
        .and_then(|v| v.to_u32().ok())
        && let Some(name) = crate::llama::gguf::file_type_name(u64::from(ft))
    {
        return Ok(name.to_string());
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for info in content.tensor_infos.values() {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(t, _)| t)
        .ok_or_else(|| "the file has no tensors".to_string())
}

/// The number of weights in a GGUF file (all tensors), from its metadata.
pub fn gguf_parameters(path: &Path) -> Result<u64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| format!("not a GGUF file: {e}"))?;
    Ok(content
        .tensor_infos
        .values()
        .map(|i| element_count(i.shape.dims()))
        .fold(0, u64::saturating_add))
}

/// The number of elements of a tensor of these dimensions, saturating (a file may claim any
/// dimensions, and the product must not overflow).
pub(crate) fn element_count(dims: &[usize]) -> u64 {
    dims.iter().fold(1u64, |n, &d| {
        n.saturating_mul(u64::try_from(d).unwrap_or(u64::MAX))
    })
}
