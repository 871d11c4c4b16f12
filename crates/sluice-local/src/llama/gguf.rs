//! Typed, lenient access to GGUF metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::error::LocalError;

/// A view of a GGUF file's key/value metadata with typed getters. Integer
/// getters accept any integer width (writers are not consistent about it).
#[derive(Clone, Copy)]
pub(crate) struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    pub(crate) fn new(map: &'a HashMap<String, Value>) -> Self {
        Self { map }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// An optional unsigned integer; present with another type is an error.
    pub(crate) fn u64(&self, key: &str) -> Result<Option<u64>, LocalError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| wrong_type(key, "an unsigned integer", v)),
        }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<Option<usize>, LocalError> {
        Ok(self.u64(key)?.map(|v| v as usize))
    }

    pub(crate) fn required_usize(&self, key: &str) -> Result<usize, LocalError> {
        self.usize(key)?.ok_or_else(|| missing(key))
    }

    pub(crate) fn u32(&self, key: &str) -> Result<Option<u32>, LocalError> {
        match self.u64(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| {
                LocalError::InvalidModel(format!("metadata {key} = {v} is too large"))
            }),
        }
    }

    pub(crate) fn f32(&self, key: &str) -> Result<Option<f32>, LocalError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(Value::F64(v)) => Ok(Some(*v as f32)),
            Some(v) => value_u64(v)
                .map(|u| Some(u as f32))
                .ok_or_else(|| wrong_type(key, "a number", v)),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, LocalError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => value_u64(v)
                .map(|u| Some(u != 0))
                .ok_or_else(|| wrong_type(key, "a boolean", v)),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&'a str>, LocalError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(wrong_type(key, "a string", v)),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Result<Option<&'a [Value]>, LocalError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.as_slice())),
            Some(v) => Err(wrong_type(key, "an array", v)),
        }
    }

    pub(crate) fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>, LocalError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(wrong_type(key, "an array of strings", v)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub(crate) fn i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, LocalError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| value_i64(v).ok_or_else(|| wrong_type(key, "an array of integers", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub(crate) fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, LocalError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                v => Err(wrong_type(key, "an array of numbers", v)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(u64::from(x)),
        Value::U16(x) => Some(u64::from(x)),
        Value::U32(x) => Some(u64::from(x)),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(i64::from(x)),
        Value::I16(x) => Some(i64::from(x)),
        Value::I32(x) => Some(i64::from(x)),
        Value::I64(x) => Some(x),
        Value::U8(x) => Some(i64::from(x)),
        Value::U16(x) => Some(i64::from(x)),
        Value::U32(x) => Some(i64::from(x)),
        Value::U64(x) => i64::try_from(x).ok(),
        _ => None,
    }
}

fn missing(key: &str) -> LocalError {
    LocalError::InvalidModel(format!("GGUF metadata lacks {key}"))
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> LocalError {
    LocalError::InvalidModel(format!(
        "GGUF metadata {key} should be {expected}, found {:?}",
        got.value_type()
    ))
}

/// The name llama.cpp gives a `general.file_type` value.
pub(crate) fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}
