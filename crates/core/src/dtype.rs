use augur_kernels::QuantType;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// For gradient checks and numerically demanding references.
    F64,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16 (8 exponent bits, 7 mantissa bits).
    BF16,
    /// GGUF block quantization; the innermost dimension is a whole number of blocks.
    Quant(QuantType),
}

impl DType {
    /// Bytes taken by `n` contiguous elements along the innermost dimension, if `n` is valid for
    /// this dtype (quantized types need whole blocks).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        match self {
            DType::F32 => n.checked_mul(4),
            DType::F64 => n.checked_mul(8),
            DType::F16 | DType::BF16 => n.checked_mul(2),
            DType::Quant(q) => q.row_bytes(n),
        }
    }

    /// The short name (`f32`, `q4_1`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Quant(q) => q.name(),
        }
    }

    /// Whether this is a GGUF block type (storage only: no arithmetic, no gradients).
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Quant(_))
    }
}

