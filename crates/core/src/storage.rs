use std::sync::Arc;

use half::{bf16, f16};

use crate::DType;

/// An immutable byte region shared by reference count: a slice of an mmapped file or an owned buffer.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// Own `v`.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes { owner: Arc::new(v), start: 0, len }
    }

    /// A sub-range of `owner`; `None` if it is out of bounds.
    pub fn from_owner(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= (*owner).as_ref().len()).then_some(Bytes { owner, start, len })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

/// The data behind a tensor. Typed vectors for computed tensors; raw little-endian bytes for
/// weights read from files (quantized blocks, or f16/bf16 kept in their file form).
#[derive(Debug)]
pub enum Storage {
    /// f32 values.
    F32(Vec<f32>),
    /// f64 values (gradient checks).
    F64(Vec<f64>),
    /// f16 values.
    F16(Vec<f16>),
    /// bf16 values.
    BF16(Vec<bf16>),
    /// Bytes of another type (GGUF quantized blocks), possibly memory-mapped.
    Raw {
        /// The element or block type.
        dtype: DType,
        /// The raw bytes (often a view of a memory-mapped file).
        bytes: Bytes,
    },
    /// Memory of a device (`crate::device`).
    Device(Box<dyn crate::device::DeviceBuffer>),
}

impl Storage {
    /// The element type held.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::Raw { dtype, .. } => *dtype,
            Storage::Device(b) => b.dtype(),
        }
    }

    /// Raw bytes, for Raw storage only.
    pub fn raw(&self) -> Option<&[u8]> {
        match self {
            Storage::Raw { bytes, .. } => Some(bytes.as_slice()),
            _ => None,
        }
    }
}
