use std::sync::Arc;

use half::{bf16, f16};

use crate::DType;

/// An immutable byte region shared by reference count: a slice of an mmapped file or an owned buffer.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
    /// Whether `owner` is a read-only map of a file, whose pages [`Bytes::release_pages`] may drop.
    file_map: bool,
}

impl Bytes {
    /// Own `v`.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes { owner: Arc::new(v), start: 0, len, file_map: false }
    }

    /// A sub-range of `owner`; `None` if it is out of bounds.
    pub fn from_owner(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= (*owner).as_ref().len()).then_some(Bytes { owner, start, len, file_map: false })
    }

    /// [`Bytes::from_owner`] for a read-only memory map of a file (`mmap` with `PROT_READ`), whose
    /// resident pages [`Bytes::release_pages`] may hand back to the kernel.
    pub fn from_file_map(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Option<Self> {
        Bytes::from_owner(owner, start, len).map(|b| Bytes { file_map: true, ..b })
    }

    /// Drop this range's whole pages from the process's resident memory, when the bytes are a
    /// map of a file (a no-op otherwise): a later read faults them back in from the file, so the
    /// bytes stay valid. For weights that a faster copy has replaced.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if self.file_map {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
            let p = self.as_slice().as_ptr() as usize;
            let (from, to) = (p.next_multiple_of(page), (p + self.len) / page * page);
            if to > from {
                // SAFETY: whole pages inside a read-only shared file mapping that `owner` keeps
                // alive; MADV_DONTNEED only drops their resident copies, which later reads fault
                // back in from the file. The advice can fail only for invalid ranges, and then
                // nothing changed.
                unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED) };
            }
        }
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
