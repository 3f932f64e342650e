//! GGUF: ggml's single-file model format.
//!
//! Layout (little endian): magic `GGUF`, version (u32; 2 and 3 are read, 3 is written), tensor
//! count (u64), metadata count (u64), the metadata key/values, the tensor infos (name, rank, dims
//! with the innermost first, ggml type, offset), padding to `general.alignment` (default 32), then
//! the tensor data. augur shapes are outermost-first, so GGUF dims `[ne0, ne1]` become `[ne1, ne0]`.

mod reader;
mod value;
mod writer;

pub use reader::{Gguf, TensorInfo};
pub use value::{Value, ValueType};
pub use writer::Writer;

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

use augur_core::{DType, QuantType};

/// The augur dtype of a ggml type id, if augur can compute with it.
pub fn dtype_of(ggml_type: u32) -> Option<DType> {
    match ggml_type {
        0 => Some(DType::F32),
        28 => Some(DType::F64),
        1 => Some(DType::F16),
        30 => Some(DType::BF16),
        t => QuantType::from_ggml_id(t).map(DType::Quant),
    }
}

/// The ggml type id of an augur dtype.
pub fn ggml_type_of(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F64 => 28,
        DType::F16 => 1,
        DType::BF16 => 30,
        DType::Quant(q) => q.ggml_id(),
    }
}

/// A readable name for any ggml type id, known to augur or not.
pub fn ggml_type_name(t: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
        "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(t as usize).map(|s| s.to_string()).unwrap_or_else(|| format!("type#{t}"))
}
