//! Tensors on an accelerator.
//!
//! The core knows devices only through two traits: a [`Backend`] runs every primitive op of
//! `ops` on its own memory, and a [`DeviceBuffer`] is one allocation of that memory. A tensor
//! whose storage is [`Storage::Device`] keeps the ordinary [`Layout`] (views stay free), and
//! each op in `ops` hands its work to the backend of its device inputs before any host code
//! runs, so the differentiable ops, their derivative rules and `backward` are the same code on
//! every device. A host operand of a device op is uploaded for it (a bias table, a mask); the
//! host reads of a device tensor (`to_vec_f32`, `item`) download it.
//!
//! The CUDA backend lives in `augur-cuda` (`augur_cuda::train`).

use std::any::Any;
use std::sync::Arc;

use rayon::prelude::*;

use crate::autograd::record;
use crate::error::{invalid, Error, Result};
use crate::ops::{AttentionMask, BinaryOp, UnaryOp};
use crate::{DType, Layout, Storage, Tensor};

/// One allocation of device memory, holding `len` elements of `dtype`.
pub trait DeviceBuffer: Send + Sync + std::fmt::Debug {
    /// The element type.
    fn dtype(&self) -> DType;
    /// Elements held.
    fn len(&self) -> usize;
    /// Whether it holds no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The backend that owns it.
    fn backend(&self) -> Device;
    /// For the backend to reach its own buffer type.
    fn as_any(&self) -> &dyn Any;
}

/// The gradients of an attention call: `(dq, dk, dv, dbias)`.
pub type AttentionGrads = (Tensor, Tensor, Tensor, Option<Tensor>);

/// One AdamW update of a parameter (the hyper-parameters of [`Backend::adamw`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// `β₁`, `β₂`.
    pub betas: (f32, f32),
    /// Denominator epsilon.
    pub eps: f32,
    /// The multiplier of the weights before the update (`1 − lr·weight_decay`, or 1).
    pub decay: f32,
    /// `1 − β₁ᵗ`.
    pub bias1: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bias2_sqrt: f32,
}

impl AdamStep {
    /// The update on the host: `w ← decay·w − lr/bias1 · m / (√v / bias2_sqrt + eps)` after the
    /// moments take `g`, over chunks of the thread pool.
    pub fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        assert!(w.len() == g.len() && w.len() == m.len() && w.len() == v.len(), "AdamStep::apply: lengths differ");
        const CHUNK: usize = 1 << 14;
        let h = *self;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| adam_chunk(h, w, g, m, v));
    }
}

augur_kernels::multiversion! {
    /// [`AdamStep::apply`] on one chunk.
    fn adam_chunk(h: AdamStep, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = h.betas;
        let step_size = h.lr / h.bias1;
        for ((w, &g), (m, v)) in w.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
            *w *= h.decay;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / h.bias2_sqrt + h.eps;
            *w -= step_size * *m / denom;
        }
    }
}

/// The primitive ops of one device. Inputs may be any float dtype and any layout; outputs are
/// contiguous, in f64 when an input is f64 and f32 otherwise, as on the host, except that a
/// backend may keep elementwise results of 16-bit inputs (all of one type) in that type, as
/// PyTorch's autocast does. Shapes have been checked by the caller (`ops`), which passes the
/// output shape where it computed one.
#[allow(missing_docs)]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `cuda:0`.
    fn name(&self) -> String;
    /// A host tensor's values in a new device buffer (quantized tensors arrive dequantized, f32).
    fn upload(&self, t: &Tensor) -> Result<Tensor>;
    /// A device tensor's values as a contiguous host tensor of the same dtype.
    fn download(&self, t: &Tensor) -> Result<Tensor>;
    /// Wait for every queued op.
    fn synchronize(&self) -> Result<()>;

    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor>;
    fn affine(&self, x: &Tensor, mul: f64, add: f64) -> Result<Tensor>;
    fn binary(&self, a: &Tensor, b: &Tensor, op: BinaryOp, shape: &[usize]) -> Result<Tensor>;
    fn sum_to(&self, x: &Tensor, shape: &[usize]) -> Result<Tensor>;
    fn max_last(&self, x: &Tensor) -> Result<Tensor>;
    /// `[.., m, k] × [.., k, n]` with `b` batched like `a` (the caller made both the same rank);
    /// the output in `shape`, of type `out` (the compute type for `None`).
    fn matmul(&self, a: &Tensor, b: &Tensor, shape: &[usize], out: Option<DType>) -> Result<Tensor>;
    /// A contiguous copy converted to `dtype` (also `contiguous` and `to_dtype`).
    fn copy(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;
    fn cat(&self, ts: &[&Tensor], dim: usize, shape: &[usize]) -> Result<Tensor>;
    fn pad(&self, g: &Tensor, dim: usize, start: usize, full: usize) -> Result<Tensor>;
    fn softmax_last(&self, x: &Tensor, log: bool) -> Result<Tensor>;
    fn norm(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64, center: bool) -> Result<Tensor>;
    fn norm_backward(&self, x: &Tensor, w: &Tensor, g: &Tensor, eps: f64, center: bool) -> Result<(Tensor, Tensor, Option<Tensor>)>;
    fn gather_rows(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor>;
    fn scatter_add_rows(&self, g: &Tensor, ids: &[u32], rows: usize) -> Result<Tensor>;
    /// The 0-d mean loss over the rows whose target is not `ignore`, and their count.
    fn cross_entropy(&self, logits: &Tensor, targets: &[u32], ignore: Option<u32>) -> Result<(Tensor, usize)>;
    /// `d loss / d logits` times the upstream scalar `g`, in the logits' type or the compute
    /// type (16-bit logits may get a 16-bit gradient, as autocast's products do).
    fn cross_entropy_backward(&self, logits: &Tensor, targets: &[u32], ignore: Option<u32>, count: usize, g: &Tensor) -> Result<Tensor>;
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor>;
    /// `(out, lse)`; the shape `s` has been checked.
    fn attention(&self, s: &augur_kernels::flash::Shape, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, m: &AttentionMask) -> Result<(Tensor, Tensor)>;
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: &augur_kernels::flash::Shape,
        qkv: (&Tensor, &Tensor, &Tensor),
        bias: Option<&Tensor>,
        m: &AttentionMask,
        out: &Tensor,
        lse: &Tensor,
        g: &Tensor,
    ) -> Result<AttentionGrads>;
    /// One AdamW step in place: `p`, `m`, `v` are contiguous f32 buffers of `g`'s size.
    fn adamw(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: AdamStep) -> Result<()>;
}

/// A device: the backend that runs its ops. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Device(pub Arc<dyn Backend>);

impl Device {
    /// `cuda:0`.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// Whether two handles name the same device.
    pub fn same(&self, other: &Device) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl std::ops::Deref for Device {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// The device of the first device tensor among `ts`, if any; two different devices are an error.
pub(crate) fn device_of(op: &'static str, ts: &[&Tensor]) -> Result<Option<Device>> {
    let mut found: Option<Device> = None;
    for t in ts {
        if let Some(d) = t.device() {
            match &found {
                Some(f) if !f.same(&d) => return invalid(op, format!("inputs on two devices ({} and {}); move one with to_device", f.name(), d.name())),
                Some(_) => {}
                None => found = Some(d),
            }
        }
    }
    Ok(found)
}

/// `t` on `dev`: itself when it is there, else an upload (a host operand of a device op).
pub fn on(dev: &Device, t: &Tensor) -> Result<Tensor> {
    match t.device() {
        Some(d) if d.same(dev) => Ok(t.clone()),
        Some(d) => invalid("to_device", format!("tensor is on {}, not {}", d.name(), dev.name())),
        None => dev.upload(t),
    }
}

impl Tensor {
    /// A tensor over a device buffer (what backends return).
    pub fn from_device(buf: Box<dyn DeviceBuffer>, shape: &[usize]) -> Result<Tensor> {
        let want: usize = shape.iter().product();
        if buf.len() < want {
            return Err(Error::SizeMismatch { shape: shape.to_vec(), dtype: buf.dtype(), got: buf.len(), want });
        }
        Ok(Tensor { storage: Arc::new(Storage::Device(buf)), layout: Layout::contiguous(shape), autograd: None })
    }

    /// The device buffer behind this tensor, if it lives on a device.
    pub fn device_buffer(&self) -> Option<&dyn DeviceBuffer> {
        match &*self.storage {
            Storage::Device(b) => Some(&**b),
            _ => None,
        }
    }

    /// The device holding this tensor (`None`: host memory).
    pub fn device(&self) -> Option<Device> {
        self.device_buffer().map(|b| b.backend())
    }

    /// The device name (`cpu`, `cuda:0`).
    pub fn device_name(&self) -> String {
        self.device().map_or_else(|| "cpu".to_string(), |d| d.name())
    }

    /// This tensor on `dev` (differentiable: the gradient comes back to the host).
    pub fn to_device(&self, dev: &Device) -> Result<Tensor> {
        let out = on(dev, self)?.detach();
        Ok(record(out, "to_device", &[self], |g, _| Ok(vec![Some(g.to_cpu()?)])))
    }

    /// This tensor in host memory (differentiable: the gradient goes back to its device).
    pub fn to_cpu(&self) -> Result<Tensor> {
        let Some(dev) = self.device() else { return Ok(self.clone()) };
        let out = dev.download(self)?;
        Ok(record(out, "to_cpu", &[self], move |g, _| Ok(vec![Some(g.to_device(&dev)?)])))
    }

    /// This tensor on `dev`, or in host memory for `None`.
    pub fn to(&self, dev: Option<&Device>) -> Result<Tensor> {
        match dev {
            Some(d) => self.to_device(d),
            None => self.to_cpu(),
        }
    }

    /// A tensor of `shape` filled with `v` on this tensor's device, in its float dtype.
    pub fn full_like_device(&self, shape: &[usize], v: f32) -> Result<Tensor> {
        let t = Tensor::full(shape, v);
        let t = if self.dtype() == DType::F64 { crate::ops::to_dtype(&t, DType::F64)? } else { t };
        match self.device() {
            Some(d) => d.upload(&t),
            None => Ok(t),
        }
    }

    /// One AdamW update of this parameter in place from `grad`, with the moment buffers `m` and
    /// `v` (f32, this parameter's size, on its device). Host parameters use the optimizer's own
    /// loop; this is the device path.
    pub fn adamw_device(&self, grad: &Tensor, m: &Tensor, v: &Tensor, h: AdamStep) -> Result<()> {
        let Some(dev) = self.device() else { return invalid("adamw", "the parameter is in host memory") };
        let g = on(&dev, grad)?;
        if self.dtype() != DType::F32 || !self.layout.is_contiguous() || self.layout.offset() != 0 || g.numel() != self.numel() || m.numel() != self.numel() || v.numel() != self.numel() {
            return invalid("adamw", format!("the parameter {:?} must be a whole f32 buffer with moments and gradient of its size", self.shape()));
        }
        dev.adamw(self, &g, m, v, h)
    }
}
