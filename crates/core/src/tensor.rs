use std::borrow::Cow;
use std::sync::Arc;

use augur_kernels::matmul::{Matrix, Weights};
use half::{bf16, f16};

use crate::autograd::Meta;
use crate::error::{invalid, Error, Result};
use crate::float::Float;
use crate::{Bytes, DType, Layout, Storage};

/// An n-dimensional array: shared storage plus a strided layout.
///
/// Cloning is cheap (the storage is reference counted) and a clone is the same tensor to autograd
/// (it shares the gradient). Views share storage; compute ops return new contiguous tensors (f64
/// when an input is f64, else f32; bf16/f16 under autocast for matmuls and attention).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) storage: Arc<Storage>,
    pub(crate) layout: Layout,
    pub(crate) autograd: Option<Arc<Meta>>,
}

fn cast_slice<T>(b: &[u8]) -> Option<&[T]> {
    // SAFETY: T is f16/bf16 (plain-old-data, every bit pattern valid); align_to only yields a
    // middle slice at T's alignment.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

impl Tensor {
    fn new(storage: Storage, shape: &[usize]) -> Self {
        Tensor { storage: Arc::new(storage), layout: Layout::contiguous(shape), autograd: None }
    }

    fn check_len(len: usize, shape: &[usize], dtype: DType) -> Result<()> {
        let want: usize = shape.iter().product();
        if len != want {
            return Err(Error::SizeMismatch { shape: shape.to_vec(), dtype, got: len, want });
        }
        Ok(())
    }

    /// An f32 tensor of `shape` owning `data` (row-major); fails when the lengths differ.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::check_len(data.len(), shape, DType::F32)?;
        Ok(Self::new(Storage::F32(data), shape))
    }

    /// An f64 tensor of `shape` owning `data` (row-major).
    pub fn from_f64(data: Vec<f64>, shape: &[usize]) -> Result<Self> {
        Self::check_len(data.len(), shape, DType::F64)?;
        Ok(Self::new(Storage::F64(data), shape))
    }

    /// A 0-d f32 tensor.
    pub fn scalar(v: f32) -> Self {
        Self::new(Storage::F32(vec![v]), &[])
    }

    /// An f32 tensor of `shape` with every element `v`.
    pub fn full(shape: &[usize], v: f32) -> Self {
        Self::new(Storage::F32(vec![v; shape.iter().product()]), shape)
    }

    /// An f32 tensor of ones.
    pub fn ones(shape: &[usize]) -> Self {
        Self::full(shape, 1.0)
    }

    /// A contiguous tensor of computed values (f32 or f64).
    pub(crate) fn from_values<T: Float>(v: Vec<T>, shape: &[usize]) -> Tensor {
        debug_assert_eq!(v.len(), shape.iter().product::<usize>());
        Self::new(T::storage(v), shape)
    }

    /// An f16 tensor of `shape` owning `data`.
    pub fn from_f16(data: Vec<f16>, shape: &[usize]) -> Result<Self> {
        Self::check_len(data.len(), shape, DType::F16)?;
        Ok(Self::new(Storage::F16(data), shape))
    }

    /// A bf16 tensor of `shape` owning `data`.
    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Result<Self> {
        Self::check_len(data.len(), shape, DType::BF16)?;
        Ok(Self::new(Storage::BF16(data), shape))
    }

    /// An f32 tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::new(Storage::F32(vec![0.0; shape.iter().product()]), shape)
    }

    /// A tensor over raw little-endian bytes (e.g. an mmapped GGUF region). F32 data is copied
    /// into an owned vector (it is small: norms, biases); f16/bf16 stay raw when aligned, quantized
    /// data always stays raw.
    pub fn from_raw(dtype: DType, bytes: Bytes, shape: &[usize]) -> Result<Self> {
        let inner = *shape.last().unwrap_or(&1);
        let outer: usize = shape.iter().rev().skip(1).product();
        let want = dtype
            .bytes_for(inner)
            .and_then(|r| r.checked_mul(outer))
            .ok_or_else(|| Error::Invalid { op: "from_raw", msg: format!("shape {shape:?} is not valid for {}", dtype.name()) })?;
        let b = bytes.as_slice();
        if b.len() != want {
            return Err(Error::SizeMismatch { shape: shape.to_vec(), dtype, got: b.len(), want });
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            DType::F64 => Storage::F64(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
            DType::F16 if cast_slice::<f16>(b).is_none() => {
                Storage::F16(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect())
            }
            DType::BF16 if cast_slice::<bf16>(b).is_none() => {
                Storage::BF16(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect())
            }
            _ => Storage::Raw { dtype, bytes },
        };
        Ok(Self::new(storage, shape))
    }

    /// Size of each dimension.
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    /// `(rows, cols)` of a rank-2 tensor; an error for any other rank.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape() {
            &[a, b] => Ok((a, b)),
            s => invalid("dims2", format!("expected a 2-d tensor, got shape {s:?}")),
        }
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape().len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// Element (or block) type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// Shape, strides and offset into the storage.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The shared buffer this tensor views.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same data under another layout, outside the autograd graph (the differentiable views
    /// in `autograd::rules` record themselves).
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor { storage: self.storage.clone(), layout, autograd: None }
    }

    fn require_unquantized(&self, op: &'static str) -> Result<()> {
        if self.dtype().is_quantized() {
            return Err(Error::UnsupportedDType { op, dtype: self.dtype(), hint: " (dequantize with to_f32() first)" });
        }
        Ok(())
    }

    pub(crate) fn reshape_raw(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dtype().is_quantized() && shape.last() != self.shape().last() {
            return invalid("reshape", "a quantized tensor keeps its innermost (block) dimension");
        }
        Ok(self.with_layout(self.layout.reshape(shape)?))
    }

    pub(crate) fn transpose_raw(&self, a: usize, b: usize) -> Result<Tensor> {
        self.require_unquantized("transpose")?;
        Ok(self.with_layout(self.layout.transpose(a, b)?))
    }

    pub(crate) fn narrow_raw(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if self.dtype().is_quantized() && dim + 1 == self.rank() {
            return invalid("narrow", "cannot narrow inside quantized blocks");
        }
        Ok(self.with_layout(self.layout.narrow(dim, start, len)?))
    }

    pub(crate) fn broadcast_to_raw(&self, shape: &[usize]) -> Result<Tensor> {
        self.require_unquantized("broadcast_to")?;
        Ok(self.with_layout(self.layout.broadcast_to(shape)?))
    }

    /// All elements in row-major order as `T`, borrowed when the storage already is exactly that.
    pub(crate) fn values<T: Float>(&self) -> Result<Cow<'_, [T]>> {
        if let Some(d) = self.device() {
            return Ok(Cow::Owned(d.download(self)?.values::<T>()?.into_owned()));
        }
        if self.layout.is_contiguous() {
            if let Some(v) = T::slice(&self.storage) {
                return Ok(Cow::Borrowed(&v[self.layout.offset()..self.layout.offset() + self.numel()]));
            }
        }
        Ok(Cow::Owned(match &*self.storage {
            Storage::F64(v) => self.layout.gather(v, T::from_f64),
            Storage::F32(v) => self.layout.gather(v, T::from_f32),
            _ => self.to_vec_f32()?.into_iter().map(T::from_f32).collect(),
        }))
    }

    /// All elements as f64 in row-major order.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        Ok(self.values::<f64>()?.into_owned())
    }

    /// The value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return invalid("item", format!("tensor of shape {:?} has {} elements, not one", self.shape(), self.numel()));
        }
        Ok(self.values::<f32>()?[0])
    }

    /// Contiguous f32 data, borrowed when the tensor already is exactly that.
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        match &*self.storage {
            Storage::F32(v) if self.layout.is_contiguous() => Some(&v[self.layout.offset()..self.layout.offset() + self.numel()]),
            _ => None,
        }
    }

    /// All elements as f32 in row-major order (dequantizing / converting as needed).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if let Some(s) = self.as_f32_slice() {
            return Ok(s.to_vec());
        }
        if let Some(d) = self.device() {
            return d.download(self)?.to_vec_f32();
        }
        let l = &self.layout;
        Ok(match &*self.storage {
            Storage::F32(v) => l.gather(v, |x| x),
            Storage::F64(v) => l.gather(v, |x| x as f32),
            Storage::F16(v) => l.gather(v, f16::to_f32),
            Storage::BF16(v) => l.gather(v, bf16::to_f32),
            Storage::Raw { dtype, bytes } => {
                let b = bytes.as_slice();
                match dtype {
                    DType::F16 => l.gather(cast_slice::<f16>(b).expect("aligned"), f16::to_f32),
                    DType::BF16 => l.gather(cast_slice::<bf16>(b).expect("aligned"), bf16::to_f32),
                    DType::Quant(_) | DType::F32 | DType::F64 => {
                        // Quantized tensors are always contiguous rows (views cannot split blocks).
                        let (rows, k) = (self.numel() / self.shape().last().copied().unwrap_or(1), *self.shape().last().unwrap_or(&1));
                        let m = self.matrix_rows(k)?;
                        let mut out = vec![0f32; rows * k];
                        let first = l.offset() / k.max(1);
                        for (r, dst) in out.chunks_exact_mut(k.max(1)).enumerate() {
                            m.row_f32(first + r, dst);
                        }
                        out
                    }
                }
            }
            Storage::Device(_) => unreachable!("downloaded above"),
        })
    }

    /// Hand the resident pages of a memory-mapped weight back to the kernel (a no-op for other
    /// storage): for a weight whose packed copy serves every pass, so the process does not hold
    /// both. The bytes stay readable (they fault back in from the file).
    pub fn release_pages(&self) {
        if let Storage::Raw { bytes, .. } = &*self.storage {
            bytes.release_pages();
        }
    }

    /// A contiguous f32 copy.
    pub fn to_f32(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_vec_f32()?, self.shape())
    }

    fn matrix_rows(&self, k: usize) -> Result<Matrix<'_>> {
        let total_rows = match &*self.storage {
            Storage::F32(v) => v.len() / k.max(1),
            Storage::F64(_) => return Err(Error::UnsupportedDType { op: "matrix", dtype: DType::F64, hint: " (weight kernels take f32, f16, bf16 or quantized)" }),
            Storage::F16(v) => v.len() / k.max(1),
            Storage::BF16(v) => v.len() / k.max(1),
            Storage::Raw { dtype, bytes } => bytes.as_slice().len() / dtype.bytes_for(k).unwrap_or(usize::MAX).max(1),
            Storage::Device(_) => return invalid("matrix", "the weight is in device memory: the host kernels cannot read it"),
        };
        let weights = match &*self.storage {
            Storage::F32(v) => Weights::F32(&v[..total_rows * k]),
            Storage::F64(_) | Storage::Device(_) => unreachable!("rejected above"),
            Storage::F16(v) => Weights::F16(&v[..total_rows * k]),
            Storage::BF16(v) => Weights::BF16(&v[..total_rows * k]),
            Storage::Raw { dtype, bytes } => match dtype {
                DType::Quant(q) => Weights::Quant(*q, bytes.as_slice()),
                DType::F16 => Weights::F16(cast_slice(bytes.as_slice()).expect("aligned at construction")),
                DType::BF16 => Weights::BF16(cast_slice(bytes.as_slice()).expect("aligned at construction")),
                DType::F32 | DType::F64 => unreachable!("f32/f64 raw data is converted at construction"),
            },
        };
        Matrix::new(weights, total_rows, k).ok_or_else(|| Error::Invalid { op: "matrix", msg: "storage size does not match shape".into() })
    }

    /// This tensor as a `rows × k` weight matrix for the kernels. Must be 2-d and contiguous
    /// from the start of its storage.
    pub fn matrix(&self) -> Result<Matrix<'_>> {
        let (rows, k) = self.dims2()?;
        if !self.layout.is_contiguous() || self.layout.offset() != 0 {
            return invalid("matrix", "weight matrices must be contiguous and unsliced");
        }
        let m = self.matrix_rows(k)?;
        if m.rows != rows {
            return invalid("matrix", format!("storage holds {} rows, shape says {rows}", m.rows));
        }
        Ok(m)
    }
}

impl Tensor {
    /// This tensor's f32 values for an in-place update (what an optimizer does to a parameter).
    /// The tensor keeps its autograd identity; its data is copied first if the storage is shared
    /// (for example saved by a graph that has not been freed) or is not a whole f32 buffer.
    pub fn values_mut_f32(&mut self) -> Result<&mut [f32]> {
        if self.device().is_some() {
            return invalid("values_mut_f32", format!("the tensor is on {}: update it with device ops (Tensor::adamw_device)", self.device_name()));
        }
        let whole = self.layout.is_contiguous() && self.layout.offset() == 0 && matches!(&*self.storage, Storage::F32(v) if v.len() == self.numel());
        if !whole || Arc::get_mut(&mut self.storage).is_none() {
            let v = self.to_vec_f32()?;
            self.storage = Arc::new(Storage::F32(v));
            self.layout = Layout::contiguous(self.layout.shape());
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::F32(v)) => Ok(v),
            _ => unreachable!("made unique f32 above"),
        }
    }
}
