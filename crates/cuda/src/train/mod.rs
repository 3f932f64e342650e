//! augur-core's tensor ops on the device: the [`augur_core::Backend`] that lets the same
//! autograd, `nn` modules and optimizers train on an NVIDIA GPU.
//!
//! [`backend`] opens a device and returns an [`augur_core::Device`]; `tensor.to_device(&dev)`
//! moves tensors there, and every op on them runs here: elementwise ops, reductions, norms,
//! softmax, cross-entropy, RoPE and embedding gather/scatter as kernels of `train.cu` (f32 and
//! f64), matrix products through cuBLAS (f32, f64, and bf16/f16 with f32 accumulation under
//! autocast), attention through the tensor-core FlashAttention of `flash.cu` for 16-bit inputs
//! with heads of 64 or 128 and through `train.cu`'s general kernels otherwise. Work is queued on
//! the device's one stream; only reads to the host wait for it.

mod attn;
mod lay;
mod matmul;
mod profile;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use augur_core::device::{AdamStep, AttentionGrads, DeviceBuffer};
use augur_core::{AttentionMask, Backend, BinaryOp, DType, Layout, Tensor, UnaryOp};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::device::{compile, Device, Program};
use crate::flash::Flash;
use lay::Lay;
pub use profile::profile_report;

pub(crate) const TRAIN: Program = Program { name: "train", source: include_str!("../train.cu") };

const THREADS: u32 = 256;
/// cuBLAS's workspace (what PyTorch gives it on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;
/// Most dynamic shared memory the general attention kernels may take (scores of a row).
const ATTN_SMEM: usize = 200 * 1024;

/// augur-core's error and result, which every backend method returns.
mod core {
    pub use augur_core::{Error, Result};
}

fn cuda_err(e: impl std::fmt::Display) -> core::Error {
    core::Error::Invalid { op: "cuda", msg: e.to_string() }
}

fn dt_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        _ => 3,
    }
}

fn elem_size(d: DType) -> usize {
    d.bytes_for(1).unwrap_or(4)
}

/// One allocation of device memory for a tensor.
pub struct Buffer {
    slice: CudaSlice<u8>,
    ptr: u64,
    dtype: DType,
    len: usize,
    owner: Arc<Cuda>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} × {} on {})", self.len, self.dtype.name(), self.owner.name())
    }
}

impl DeviceBuffer for Buffer {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
    fn backend(&self) -> augur_core::Device {
        augur_core::Device(self.owner.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[allow(missing_docs)]
struct Kernels {
    copy: CudaFunction,
    adamw: CudaFunction,
    // [f32 compute, f64] each
    unary: [CudaFunction; 2],
    affine: [CudaFunction; 2],
    binary: [CudaFunction; 2],
    rope: [CudaFunction; 2],
    reduce_rows: [CudaFunction; 2],
    reduce_cols: [CudaFunction; 2],
    reduce_all: [CudaFunction; 2],
    reduce_strided: [CudaFunction; 2],
    softmax: [CudaFunction; 2],
    norm: [CudaFunction; 2],
    norm_bwd: [CudaFunction; 2],
    gather: [CudaFunction; 2],
    scatter_add: [CudaFunction; 2],
    ce_fwd: [CudaFunction; 2],
    ce_bwd: [CudaFunction; 2],
    attn_fwd: [CudaFunction; 2],
    attn_bwd: [CudaFunction; 2],
}

/// The training backend of one device.
pub struct Cuda {
    dev: Arc<Device>,
    k: Kernels,
    blas: Mutex<CudaBlas>,
    _workspace: CudaSlice<u8>,
    flash: OnceLock<std::result::Result<Flash, String>>,
    me: Weak<Cuda>,
    _module: Arc<CudaModule>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({:?})", self.dev)
    }
}

/// Keep memory freed by the stream-ordered allocator in its pool instead of returning it to the
/// driver at every synchronisation: a training step frees and allocates the same activation
/// sizes every step, and remapping them each time costs more than the kernels.
fn keep_freed_memory(dev: &Device) -> crate::Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: the device handle is live; the attribute takes a u64 threshold.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, dev.ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut keep as *mut u64 as *mut std::ffi::c_void).result()?;
    }
    Ok(())
}

/// Open device `ordinal` for training: an [`augur_core::Device`] to move tensors to.
pub fn backend(ordinal: usize) -> crate::Result<augur_core::Device> {
    Ok(augur_core::Device(Cuda::new(&Device::open(ordinal)?)?))
}

impl Cuda {
    /// The training backend on an open device (compiles `train.cu`, or loads it from the cache).
    pub fn new(dev: &Arc<Device>) -> crate::Result<Arc<Cuda>> {
        let (major, minor) = dev.ctx.compute_capability()?;
        let module = dev.ctx.load_module(compile(&TRAIN, major, minor)?)?;
        let f = |name: &str| module.load_function(name);
        let two = |name: &str| -> std::result::Result<[CudaFunction; 2], cudarc::driver::DriverError> { Ok([f(&format!("{name}_f32"))?, f(&format!("{name}_f64"))?]) };
        let k = Kernels {
            copy: f("copy_any")?,
            adamw: f("adamw")?,
            unary: two("unary")?,
            affine: two("affine")?,
            binary: two("binary")?,
            rope: two("rope")?,
            reduce_rows: two("reduce_rows")?,
            reduce_cols: two("reduce_cols")?,
            reduce_all: two("reduce_all")?,
            reduce_strided: two("reduce_strided")?,
            softmax: two("softmax")?,
            norm: two("norm")?,
            norm_bwd: two("norm_bwd")?,
            gather: two("gather")?,
            scatter_add: two("scatter_add")?,
            ce_fwd: two("ce_fwd")?,
            ce_bwd: two("ce_bwd")?,
            attn_fwd: two("attn_fwd")?,
            attn_bwd: two("attn_bwd")?,
        };
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
        for fun in k.attn_fwd.iter().chain(&k.attn_bwd).chain(&k.norm_bwd) {
            fun.set_attribute(MAX_SMEM, ATTN_SMEM as i32)?;
        }
        keep_freed_memory(dev)?;
        let blas = CudaBlas::new(dev.stream.clone()).map_err(|e| crate::Error::Unsupported(format!("cuBLAS could not start ({e}); put libcublas on LD_LIBRARY_PATH")))?;
        // A workspace of its own lets cuBLAS pick its fastest (split-K, stream-K) kernels.
        let workspace = dev.stream.alloc_zeros::<u8>(BLAS_WORKSPACE)?;
        // SAFETY: the workspace lives as long as the handle (both are fields of `Cuda`) and is
        // used only by this handle on its stream.
        unsafe {
            let (ptr, _) = workspace.device_ptr(&dev.stream);
            cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut std::ffi::c_void, BLAS_WORKSPACE).result().map_err(|e| crate::Error::Unsupported(format!("cuBLAS workspace: {e}")))?;
        }
        Ok(Arc::new_cyclic(|me| Cuda { dev: dev.clone(), k, blas: Mutex::new(blas), _workspace: workspace, flash: OnceLock::new(), me: me.clone(), _module: module }))
    }

    /// The device the backend runs on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    fn flash(&self) -> core::Result<&Flash> {
        self.flash.get_or_init(|| Flash::new(&self.dev).map_err(|e| e.to_string())).as_ref().map_err(|e| cuda_err(format!("FlashAttention kernels: {e}")))
    }

    /// `len` uninitialised elements of `dtype`.
    fn alloc(&self, dtype: DType, len: usize) -> core::Result<Buffer> {
        // SAFETY: every caller writes the elements it hands out before they are read.
        let slice = unsafe { self.dev.stream.alloc::<u8>((len * elem_size(dtype)).max(1)) }.map_err(cuda_err)?;
        let ptr = slice.device_ptr(&self.dev.stream).0;
        Ok(Buffer { slice, ptr, dtype, len, owner: self.me.upgrade().expect("the backend outlives its calls") })
    }

    fn zeros(&self, dtype: DType, len: usize) -> core::Result<Buffer> {
        let mut b = self.alloc(dtype, len)?;
        self.dev.stream.memset_zeros(&mut b.slice).map_err(cuda_err)?;
        Ok(b)
    }

    fn upload_bytes(&self, dtype: DType, len: usize, bytes: &[u8]) -> core::Result<Buffer> {
        let mut b = self.alloc(dtype, len)?;
        if !bytes.is_empty() {
            self.dev.stream.memcpy_htod(bytes, &mut b.slice.slice_mut(..bytes.len())).map_err(cuda_err)?;
        }
        Ok(b)
    }

    /// Bytes of another type (ids, targets, masks), in a buffer of whole 4-byte words.
    fn upload_raw(&self, bytes: &[u8]) -> core::Result<Buffer> {
        self.upload_bytes(DType::F32, bytes.len().div_ceil(4), bytes)
    }

    fn tensor(b: Buffer, shape: &[usize]) -> core::Result<Tensor> {
        Tensor::from_device(Box::new(b), shape)
    }

    fn buffer(t: &Tensor) -> core::Result<&Buffer> {
        t.device_buffer().and_then(|b| b.as_any().downcast_ref::<Buffer>()).ok_or_else(|| cuda_err("a tensor of another device reached the CUDA backend"))
    }

    /// A contiguous f32 tensor on this backend as the collectives see it: its first element's
    /// address, its length, the stream its work is queued on, and the device ordinal.
    pub(crate) fn raw_f32(t: &Tensor) -> crate::Result<(u64, usize, Arc<CudaStream>, usize)> {
        let b = Self::buffer(t).map_err(|e| crate::Error::Nccl(e.to_string()))?;
        if b.dtype != DType::F32 || !t.layout().is_contiguous() {
            return Err(crate::Error::Nccl(format!("collectives take contiguous f32 tensors, not {} of layout {:?}", b.dtype.name(), t.layout())));
        }
        Ok((Self::ptr(t).map_err(|e| crate::Error::Nccl(e.to_string()))?, t.numel(), b.owner.dev.stream.clone(), b.owner.dev.ctx.ordinal()))
    }

    /// Address of `t`'s first element (its layout's offset).
    fn ptr(t: &Tensor) -> core::Result<u64> {
        let b = Self::buffer(t)?;
        Ok(b.ptr + (t.layout().offset() * elem_size(b.dtype)) as u64)
    }

    /// `t` contiguous in `dtype` (itself when it already is).
    fn dense(&self, t: &Tensor, dtype: DType) -> core::Result<Tensor> {
        if t.dtype() == dtype && t.layout().is_contiguous() {
            Ok(t.clone())
        } else {
            self.copy(t, dtype)
        }
    }

    /// The grid of an elementwise kernel that moves eight elements a thread when `by8` (its
    /// operands pass `Lay::flat8`) and `n` is a multiple of eight, else one.
    fn grid_by8(n: usize, by8: bool) -> LaunchConfig {
        Self::grid(if by8 && n % 8 == 0 { n / 8 } else { n })
    }

    fn grid(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    fn rows(rows: usize, threads: u32, smem: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 }
    }

    fn builder<'a>(&'a self, f: &'a CudaFunction) -> LaunchArgs<'a> {
        self.dev.stream.launch_builder(f)
    }

    fn run(b: &mut LaunchArgs<'_>, cfg: LaunchConfig) -> core::Result<()> {
        // SAFETY: each caller pushes the kernel's parameters in order, with addresses of live
        // buffers sized for the launch.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda_err)
    }

    /// The output type of an elementwise op: the inputs' 16-bit type when they all share it (as
    /// under autocast: 16-bit activations stay 16-bit, as in PyTorch), else the compute type.
    fn elementwise_ty(ts: &[&Tensor]) -> DType {
        let t0 = ts[0].dtype();
        if matches!(t0, DType::BF16 | DType::F16) && ts.iter().all(|t| t.dtype() == t0) {
            t0
        } else {
            Self::compute(ts).0
        }
    }

    /// The kernel index of an output type: `_f64` for f64, `_f32` (f32 compute) for the rest.
    fn index(ty: DType) -> usize {
        usize::from(ty == DType::F64)
    }

    /// The compute type (f64 if any input is, else f32) and its kernel index.
    fn compute(ts: &[&Tensor]) -> (DType, usize) {
        if ts.iter().any(|t| t.dtype() == DType::F64) {
            (DType::F64, 1)
        } else {
            (DType::F32, 0)
        }
    }

    fn row_reduce(&self, x: &Tensor, is_max: bool) -> core::Result<Tensor> {
        let (ty, i) = Self::compute(&[x]);
        let x = self.dense(x, ty)?;
        let n = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / n.max(1);
        let out = self.alloc(ty, rows)?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank >= 1") = 1;
        if rows > 0 {
            let (xp, (r, nn, mx)) = (Self::ptr(&x)?, (rows as i64, n as i64, i32::from(is_max)));
            let mut b = self.builder(&self.k.reduce_rows[i]);
            b.arg(&xp).arg(&out.ptr).arg(&r).arg(&nn).arg(&mx);
            Self::run(&mut b, LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })?;
        }
        Self::tensor(out, &shape)
    }
}

impl Backend for Cuda {
    fn name(&self) -> String {
        format!("cuda:{}", self.dev.ctx.ordinal())
    }

    fn upload(&self, t: &Tensor) -> core::Result<Tensor> {
        let _p = self.prof("upload");
        let b = match t.dtype() {
            DType::F64 => {
                let v = t.to_vec_f64()?;
                self.upload_bytes(DType::F64, v.len(), crate::ops::bytes_of(&v))?
            }
            d @ (DType::F16 | DType::BF16) => {
                let bits: Vec<u16> = t.to_vec_f32()?.into_iter().map(|x| if d == DType::F16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() }).collect();
                self.upload_bytes(d, bits.len(), crate::ops::bytes_of(&bits))?
            }
            _ => {
                let v = t.to_vec_f32()?;
                self.upload_bytes(DType::F32, v.len(), crate::ops::bytes_of(&v))?
            }
        };
        Self::tensor(b, t.shape())
    }

    fn download(&self, t: &Tensor) -> core::Result<Tensor> {
        let _p = self.prof("download");
        let d = self.dense(t, t.dtype())?;
        let b = Self::buffer(&d)?;
        let n = d.numel();
        let mut bytes = vec![0u8; n * elem_size(b.dtype)];
        let start = d.layout().offset() * elem_size(b.dtype);
        if n > 0 {
            self.dev.stream.memcpy_dtoh(&b.slice.slice(start..start + bytes.len()), &mut bytes).map_err(cuda_err)?;
        }
        self.dev.stream.synchronize().map_err(cuda_err)?;
        let shape = t.shape();
        match b.dtype {
            DType::F64 => Tensor::from_f64(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(), shape),
            DType::F16 => Tensor::from_f16(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect(), shape),
            DType::BF16 => Tensor::from_bf16(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect(), shape),
            _ => Tensor::from_vec(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), shape),
        }
    }

    fn synchronize(&self) -> core::Result<()> {
        self.dev.stream.synchronize().map_err(cuda_err)
    }

    fn unary(&self, x: &Tensor, op: UnaryOp) -> core::Result<Tensor> {
        let _p = self.prof("unary");
        let (ty, n) = (Self::elementwise_ty(&[x]), x.numel());
        let out = self.alloc(ty, n)?;
        if n > 0 {
            let (xp, xt, lx, ot, nn, op) = (Self::buffer(x)?.ptr, dt_code(x.dtype()), Lay::merged(&[x.layout()])?[0], dt_code(ty), n as i64, op as i32);
            let mut b = self.builder(&self.k.unary[Self::index(ty)]);
            b.arg(&xp).arg(&xt).arg(&lx).arg(&out.ptr).arg(&ot).arg(&nn).arg(&op);
            Self::run(&mut b, Self::grid_by8(n, lx.flat8()))?;
        }
        Self::tensor(out, x.shape())
    }

    fn affine(&self, x: &Tensor, mul: f64, add: f64) -> core::Result<Tensor> {
        let _p = self.prof("affine");
        let (ty, n) = (Self::elementwise_ty(&[x]), x.numel());
        let out = self.alloc(ty, n)?;
        if n > 0 {
            let (xp, xt, lx, ot, nn) = (Self::buffer(x)?.ptr, dt_code(x.dtype()), Lay::merged(&[x.layout()])?[0], dt_code(ty), n as i64);
            let mut b = self.builder(&self.k.affine[Self::index(ty)]);
            b.arg(&xp).arg(&xt).arg(&lx).arg(&out.ptr).arg(&ot).arg(&nn).arg(&mul).arg(&add);
            Self::run(&mut b, Self::grid_by8(n, lx.flat8()))?;
        }
        Self::tensor(out, x.shape())
    }

    fn binary(&self, a: &Tensor, b: &Tensor, op: BinaryOp, shape: &[usize]) -> core::Result<Tensor> {
        let _p = self.prof("binary");
        let ty = Self::elementwise_ty(&[a, b]);
        let n: usize = shape.iter().product();
        let out = self.alloc(ty, n)?;
        if n == 0 {
            return Self::tensor(out, shape);
        }
        // A contiguous trailing block of b repeated along the leading dims (a bias) is indexed
        // modulo its size; anything else through both broadcast layouts.
        let bs = b.shape();
        let lead = bs.iter().take_while(|&&d| d == 1).count();
        let bias = a.shape() == shape && b.layout().is_contiguous() && shape.ends_with(&bs[lead..]) && b.numel() > 0;
        let (la, lb, mode, m) = if bias {
            let lb = Lay { offset: b.layout().offset() as i64, ..Lay::merged(&[&Layout::contiguous(&[b.numel()])])?[0] };
            (Lay::merged(&[a.layout()])?[0], lb, 1i32, b.numel() as i64)
        } else {
            let l = Lay::merged(&[&a.layout().broadcast_to(shape)?, &b.layout().broadcast_to(shape)?])?;
            (l[0], l[1], 3, 0)
        };
        let (ap, at, bp, bt, ot, nn, op) = (Self::buffer(a)?.ptr, dt_code(a.dtype()), Self::buffer(b)?.ptr, dt_code(b.dtype()), dt_code(ty), n as i64, op as i32);
        let mut l = self.builder(&self.k.binary[Self::index(ty)]);
        l.arg(&ap).arg(&at).arg(&la).arg(&bp).arg(&bt).arg(&lb).arg(&out.ptr).arg(&ot).arg(&nn).arg(&op).arg(&mode).arg(&m);
        // A bias is flat too (m is 0 otherwise).
        Self::run(&mut l, Self::grid_by8(n, la.flat8() && lb.flat8() && m % 8 == 0))?;
        Self::tensor(out, shape)
    }

    fn sum_to(&self, x: &Tensor, shape: &[usize]) -> core::Result<Tensor> {
        let _p = self.prof("sum_to");
        let (ty, i) = Self::compute(&[x]);
        let x = self.dense(x, ty)?;
        let (xs, n) = (x.shape().to_vec(), x.numel());
        let outs: usize = shape.iter().product();
        let lead = shape.iter().take_while(|&&d| d == 1).count();
        let xp = Self::ptr(&x)?;
        let (nn, oo) = (n as i64, outs as i64);
        if outs == 1 || xs.ends_with(&shape[lead..]) {
            // Whole trailing blocks summed (a bias gradient; everything when `outs` is 1).
            let out = self.zeros(ty, outs)?;
            if n > 0 && outs == 1 {
                let mut b = self.builder(&self.k.reduce_all[i]);
                b.arg(&xp).arg(&out.ptr).arg(&nn);
                Self::run(&mut b, Self::grid(n).at_most(self.dev.sm_count * 4))?;
            } else if n > 0 {
                let rows = (n / outs) as i64;
                let splits = (rows as usize).div_ceil(64).clamp(1, (self.dev.sm_count * 8).div_ceil(outs.div_ceil(32)).max(1));
                let mut b = self.builder(&self.k.reduce_cols[i]);
                b.arg(&xp).arg(&out.ptr).arg(&rows).arg(&oo);
                Self::run(&mut b, LaunchConfig { grid_dim: (outs.div_ceil(32) as u32, splits.min(65535) as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })?;
            }
            return Self::tensor(out, shape);
        }
        let mut padded = vec![1; xs.len() - shape.len()];
        padded.extend_from_slice(shape);
        if padded[..padded.len() - 1] == xs[..xs.len() - 1] && padded.last() == Some(&1) {
            return self.row_reduce(&x, false)?.reshape(shape);
        }
        // General: one thread per output, walking the reduced dims.
        let strides = x.layout().strides();
        let (mut ol, mut rl) = (Lay { rank: xs.len() as i32, ..Default::default() }, Lay { rank: xs.len() as i32, ..Default::default() });
        for d in 0..xs.len() {
            let kept = padded[d] == xs[d];
            ol.shape[d] = padded[d] as i64;
            ol.stride[d] = if kept { strides[d] as i64 } else { 0 };
            rl.shape[d] = if kept { 1 } else { xs[d] as i64 };
            rl.stride[d] = strides[d] as i64;
        }
        let red = (n / outs.max(1)) as i64;
        let out = self.alloc(ty, outs)?;
        let mut b = self.builder(&self.k.reduce_strided[i]);
        b.arg(&xp).arg(&ol).arg(&rl).arg(&out.ptr).arg(&oo).arg(&red);
        Self::run(&mut b, Self::grid(outs))?;
        Self::tensor(out, shape)
    }

    fn max_last(&self, x: &Tensor) -> core::Result<Tensor> {
        let _p = self.prof("max_last");
        self.row_reduce(x, true)
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, shape: &[usize], out: Option<DType>) -> core::Result<Tensor> {
        matmul::matmul(self, a, b, shape, out)
    }

    fn copy(&self, x: &Tensor, dtype: DType) -> core::Result<Tensor> {
        let _p = self.prof(if x.dtype() == dtype { "copy (layout)" } else if x.layout().is_contiguous() { "copy (convert)" } else { "copy (layout + convert)" });
        let n = x.numel();
        let out = self.alloc(dtype, n)?;
        let dst = Layout::contiguous(x.shape());
        self.copy_into(x, &out, &dst)?;
        Self::tensor(out, x.shape())
    }

    fn cat(&self, ts: &[&Tensor], dim: usize, shape: &[usize]) -> core::Result<Tensor> {
        let _p = self.prof("cat");
        let (ty, _) = Self::compute(ts);
        let out = self.alloc(ty, shape.iter().product())?;
        let whole = Layout::contiguous(shape);
        let mut start = 0;
        for t in ts {
            let len = t.shape()[dim];
            self.copy_into(t, &out, &whole.narrow(dim, start, len)?)?;
            start += len;
        }
        Self::tensor(out, shape)
    }

    fn pad(&self, g: &Tensor, dim: usize, start: usize, full: usize) -> core::Result<Tensor> {
        let _p = self.prof("pad");
        let (ty, _) = Self::compute(&[g]);
        let mut shape = g.shape().to_vec();
        shape[dim] = full;
        let out = self.zeros(ty, shape.iter().product())?;
        self.copy_into(g, &out, &Layout::contiguous(&shape).narrow(dim, start, g.shape()[dim])?)?;
        Self::tensor(out, &shape)
    }

    fn softmax_last(&self, x: &Tensor, log: bool) -> core::Result<Tensor> {
        let _p = self.prof("softmax_last");
        let (ty, i) = Self::compute(&[x]);
        let x = self.dense(x, ty)?;
        let n = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / n.max(1);
        let out = self.alloc(ty, x.numel())?;
        if rows > 0 {
            let (xp, nn, lg) = (Self::ptr(&x)?, n as i64, i32::from(log));
            let mut b = self.builder(&self.k.softmax[i]);
            b.arg(&xp).arg(&out.ptr).arg(&nn).arg(&lg);
            Self::run(&mut b, Self::rows(rows, THREADS, 0))?;
        }
        Self::tensor(out, x.shape())
    }

    fn norm(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, eps: f64, center: bool) -> core::Result<Tensor> {
        let _p = self.prof("norm");
        let (ty, i) = Self::compute(&[x, w]);
        let (x, w) = (self.dense(x, ty)?, self.dense(w, ty)?);
        let bias = bias.map(|b| self.dense(b, ty)).transpose()?;
        let n = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / n.max(1);
        let out = self.alloc(ty, x.numel())?;
        if rows > 0 {
            let (xp, wp, bp) = (Self::ptr(&x)?, Self::ptr(&w)?, bias.as_ref().map_or(Ok(0), Self::ptr)?);
            let (nn, c) = (n as i64, i32::from(center));
            let mut b = self.builder(&self.k.norm[i]);
            b.arg(&xp).arg(&wp).arg(&bp).arg(&out.ptr).arg(&nn).arg(&eps).arg(&c);
            Self::run(&mut b, Self::rows(rows, THREADS, 0))?;
        }
        Self::tensor(out, x.shape())
    }

    fn norm_backward(&self, x: &Tensor, w: &Tensor, g: &Tensor, eps: f64, center: bool) -> core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let _p = self.prof("norm_backward");
        let (ty, i) = Self::compute(&[x, w, g]);
        let (x, w, g) = (self.dense(x, ty)?, self.dense(w, ty)?, self.dense(g, ty)?);
        let n = *x.shape().last().unwrap_or(&1);
        let rows = x.numel() / n.max(1);
        let (dx, dw, db) = (self.alloc(ty, x.numel())?, self.zeros(ty, n)?, self.zeros(ty, n)?);
        let smem = 2 * n * elem_size(ty);
        if smem > ATTN_SMEM {
            return Err(cuda_err(format!("a norm over {n} features is wider than the device kernel's shared memory allows")));
        }
        if rows > 0 {
            let per = rows.div_ceil(self.dev.sm_count * 4).max(1);
            let (xp, wp, gp) = (Self::ptr(&x)?, Self::ptr(&w)?, Self::ptr(&g)?);
            let dbp = if center { db.ptr } else { 0 };
            let (r, nn, c, pp) = (rows as i64, n as i64, i32::from(center), per as i64);
            let mut b = self.builder(&self.k.norm_bwd[i]);
            b.arg(&xp).arg(&wp).arg(&gp).arg(&dx.ptr).arg(&dw.ptr).arg(&dbp).arg(&r).arg(&nn).arg(&eps).arg(&c).arg(&pp);
            Self::run(&mut b, Self::rows(rows.div_ceil(per), THREADS, smem))?;
        }
        let shape = x.shape().to_vec();
        Ok((Self::tensor(dx, &shape)?, Self::tensor(dw, &[n])?, if center { Some(Self::tensor(db, &[n])?) } else { None }))
    }

    fn gather_rows(&self, table: &Tensor, ids: &[u32]) -> core::Result<Tensor> {
        let _p = self.prof("gather_rows");
        let (ty, i) = Self::compute(&[table]);
        let t = self.dense(table, ty)?;
        let dim = t.shape()[1];
        let idb = self.upload_raw(crate::ops::bytes_of(ids))?;
        let out = self.alloc(ty, ids.len() * dim)?;
        if !ids.is_empty() && dim > 0 {
            let (tp, n, d) = (Self::ptr(&t)?, ids.len() as i64, dim as i64);
            let mut b = self.builder(&self.k.gather[i]);
            b.arg(&tp).arg(&idb.ptr).arg(&out.ptr).arg(&n).arg(&d);
            Self::run(&mut b, Self::grid(ids.len() * dim))?;
        }
        Self::tensor(out, &[ids.len(), dim])
    }

    fn scatter_add_rows(&self, g: &Tensor, ids: &[u32], rows: usize) -> core::Result<Tensor> {
        let _p = self.prof("scatter_add_rows");
        let (ty, i) = Self::compute(&[g]);
        let g = self.dense(g, ty)?;
        let dim = g.shape()[1];
        let idb = self.upload_raw(crate::ops::bytes_of(ids))?;
        let out = self.zeros(ty, rows * dim)?;
        if !ids.is_empty() && dim > 0 {
            let (gp, n, d) = (Self::ptr(&g)?, ids.len() as i64, dim as i64);
            let mut b = self.builder(&self.k.scatter_add[i]);
            b.arg(&gp).arg(&idb.ptr).arg(&out.ptr).arg(&n).arg(&d);
            Self::run(&mut b, Self::grid(ids.len() * dim))?;
        }
        Self::tensor(out, &[rows, dim])
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &[u32], ignore: Option<u32>) -> core::Result<(Tensor, usize)> {
        let _p = self.prof("cross_entropy");
        // The logits in their own type (16-bit under autocast: no f32 copy of the largest
        // activation of a step), computed in f32 or f64.
        let (ty, i) = Self::compute(&[logits]);
        let x = self.dense(logits, logits.dtype())?;
        let (rows, c) = (x.shape()[0], x.shape()[1]);
        let (t, count) = self.targets(targets, ignore)?;
        let loss = self.zeros(ty, 1)?;
        if count > 0 {
            let (xp, xt, cc, ic) = (Self::ptr(&x)?, dt_code(x.dtype()), c as i64, 1.0 / count as f64);
            let mut b = self.builder(&self.k.ce_fwd[i]);
            b.arg(&xp).arg(&xt).arg(&t.ptr).arg(&loss.ptr).arg(&cc).arg(&ic);
            Self::run(&mut b, Self::rows(rows, THREADS, 0))?;
        }
        Ok((Self::tensor(loss, &[])?, count))
    }

    fn cross_entropy_backward(&self, logits: &Tensor, targets: &[u32], ignore: Option<u32>, count: usize, g: &Tensor) -> core::Result<Tensor> {
        let _p = self.prof("cross_entropy_backward");
        // The gradient in the logits' type, as autograd hands it on.
        let (ty, i) = Self::compute(&[logits, g]);
        let (x, g) = (self.dense(logits, logits.dtype())?, self.dense(g, ty)?);
        let (rows, c) = (x.shape()[0], x.shape()[1]);
        let (t, _) = self.targets(targets, ignore)?;
        let out = self.alloc(x.dtype(), rows * c)?;
        if rows > 0 {
            let (xp, xt, gp, dt, cc, ic) = (Self::ptr(&x)?, dt_code(x.dtype()), Self::ptr(&g)?, dt_code(x.dtype()), c as i64, if count == 0 { 0.0 } else { 1.0 / count as f64 });
            let mut b = self.builder(&self.k.ce_bwd[i]);
            b.arg(&xp).arg(&xt).arg(&t.ptr).arg(&gp).arg(&out.ptr).arg(&dt).arg(&cc).arg(&ic);
            Self::run(&mut b, Self::rows(rows, THREADS, 0))?;
        }
        Self::tensor(out, &[rows, c])
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> core::Result<Tensor> {
        let _p = self.prof("rope");
        let ty = Self::elementwise_ty(&[x]);
        let sh = x.shape().to_vec();
        let (seq, d) = (sh[sh.len() - 2], sh[sh.len() - 1]);
        let rows = x.numel() / d.max(1);
        let out = self.alloc(ty, x.numel())?;
        if x.numel() > 0 {
            // The tables in the compute type.
            let tt = if ty == DType::F64 { DType::F64 } else { DType::F32 };
            let (c, s) = (self.dense(cos, tt)?, self.dense(sin, tt)?);
            let (xp, xt, lx, cp, sp, ot) = (Self::buffer(x)?.ptr, dt_code(x.dtype()), Lay::merged(&[x.layout()])?[0], Self::ptr(&c)?, Self::ptr(&s)?, dt_code(ty));
            let (r, sq, dd, il) = (rows as i64, seq as i32, d as i32, i32::from(interleaved));
            let mut b = self.builder(&self.k.rope[Self::index(ty)]);
            b.arg(&xp).arg(&xt).arg(&lx).arg(&cp).arg(&sp).arg(&out.ptr).arg(&ot).arg(&r).arg(&sq).arg(&dd).arg(&il);
            let pairs = rows * d / 2;
            Self::run(&mut b, Self::grid(if !interleaved && lx.rope_rows8(d) { pairs / 8 } else { pairs }))?;
        }
        Self::tensor(out, &sh)
    }

    fn attention(&self, s: &augur_kernels::flash::Shape, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, m: &AttentionMask) -> core::Result<(Tensor, Tensor)> {
        let _p = self.prof("attention");
        attn::forward(self, s, (q, k, v), bias, m)
    }

    fn attention_backward(
        &self,
        s: &augur_kernels::flash::Shape,
        qkv: (&Tensor, &Tensor, &Tensor),
        bias: Option<&Tensor>,
        m: &AttentionMask,
        out: &Tensor,
        lse: &Tensor,
        g: &Tensor,
    ) -> core::Result<AttentionGrads> {
        let _p = self.prof("attention_backward");
        attn::backward(self, s, qkv, bias, m, (out, lse, g))
    }

    fn adamw(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: AdamStep) -> core::Result<()> {
        let _p = self.prof("adamw");
        let g = self.dense(g, DType::F32)?;
        let n = p.numel();
        let (pp, gp, mp, vp, nn) = (Self::ptr(p)?, Self::ptr(&g)?, Self::ptr(m)?, Self::ptr(v)?, n as i64);
        let mut b = self.builder(&self.k.adamw);
        b.arg(&pp).arg(&gp).arg(&mp).arg(&vp).arg(&nn).arg(&h.lr).arg(&h.betas.0).arg(&h.betas.1).arg(&h.eps).arg(&h.decay).arg(&h.bias1).arg(&h.bias2_sqrt);
        Self::run(&mut b, Self::grid(n))
    }
}

impl Cuda {
    /// Copy `x` (any layout, any float type) into `dst` viewed through `layout` (same shape).
    fn copy_into(&self, x: &Tensor, dst: &Buffer, layout: &Layout) -> core::Result<()> {
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let src = Self::buffer(x)?;
        let l = Lay::merged(&[x.layout(), layout])?;
        let (sp, st, dp, dty, nn) = (src.ptr, dt_code(src.dtype), dst.ptr, dt_code(dst.dtype), n as i64);
        let mut b = self.builder(&self.k.copy);
        b.arg(&sp).arg(&st).arg(&l[0]).arg(&dp).arg(&dty).arg(&l[1]).arg(&nn);
        // Eight elements a thread when the innermost dimension holds whole groups of eight, or
        // when both are flat and aligned (a conversion).
        let flat = |l: &Lay| l.rank == 1 && l.stride[0] == 1;
        let strided8 = !(flat(&l[0]) && flat(&l[1])) && l[0].shape[l[0].rank as usize - 1] % 8 == 0;
        let per = if strided8 || (l[0].flat8() && l[1].flat8() && n % 8 == 0) { 8 } else { 1 };
        Self::run(&mut b, Self::grid(n / per))
    }

    /// Targets as i32 on the device (-1 for ignored rows) and the number counted.
    fn targets(&self, targets: &[u32], ignore: Option<u32>) -> core::Result<(Buffer, usize)> {
        let t: Vec<i32> = targets.iter().map(|&t| if Some(t) == ignore { -1 } else { t as i32 }).collect();
        let count = t.iter().filter(|&&t| t >= 0).count();
        Ok((self.upload_raw(crate::ops::bytes_of(&t))?, count))
    }
}

trait AtMost {
    fn at_most(self, blocks: usize) -> Self;
}

impl AtMost for LaunchConfig {
    /// At most `blocks` blocks (a grid-stride kernel that ends in one atomic per block).
    fn at_most(mut self, blocks: usize) -> Self {
        self.grid_dim.0 = self.grid_dim.0.min(blocks.max(1) as u32);
        self
    }
}
