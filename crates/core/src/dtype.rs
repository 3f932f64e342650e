use augur_kernels::QuantType;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// For gradient checks and numerically demanding references.
    F64,
    F16,
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

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Quant(q) => q.name(),
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Quant(_))
    }
}

