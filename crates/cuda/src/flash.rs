//! FlashAttention on tensor cores (`flash.cu`): the forward pass and the FlashAttention-2
//! backward pass over `[batch, heads, len, dim]` 16-bit tensors on the device, with causal
//! masking, an explicit `[q_len, k_len]` mask (token trees, padding) and grouped-query heads.
//! [`augur_kernels::flash`] is the CPU twin and the tests' reference.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaModule, DeviceRepr, LaunchConfig};

pub use augur_kernels::flash::Shape;

use crate::device::{compile, Buf, Device, Program};
use crate::{Error, Result};

pub(crate) const FLASH: Program = Program { name: "flash", source: concat!(include_str!("flash.cu"), include_str!("flash90.cu")) };
/// Threads of a forward block (`32 * FA_NW`) and of every other kernel's (`BW_THREADS`).
const FWD_THREADS: u32 = 128;
const THREADS: u32 = 256;
/// Query rows per forward block, keys per forward tile; keys per backward block, query rows
/// per backward step (`FA_BR`, `FA_BC`, `BW_BC`, `BW_BR`).
const FWD_ROWS: usize = 128;
const FWD_KEYS: usize = 64;
const BWD_KEYS: usize = 128;
const BWD_ROWS: usize = 64;
/// The Hopper forward pass (`flash90.cu`): threads and query rows per block, bytes of one
/// 128 x 128 tile; shared memory holds q and two buffers each of k and v, aligned to 1024.
const F3_THREADS: u32 = 256;
const F3_ROWS: usize = 128;
const F3_TILE: usize = 128 * 128 * 2;
const F3_SMEM: usize = 5 * F3_TILE + 1024;
/// The Hopper backward pass: 128 keys per block; shared memory holds k, v, two buffers each of
/// 64-row q and do tiles, ds^T (128 x 64), two buffers each of 64 lse and 64 delta values.
const F3_KEYS: usize = 128;
const F3B_SMEM: usize = 2 * F3_TILE + 4 * (F3_TILE / 2) + F3_TILE / 2 + 4 * 64 * 4 + 1024;

/// Element type of the inputs, outputs and gradients (accumulation is f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl Dtype {
    fn index(self) -> usize {
        self as usize
    }

    /// The 16 bits of `x` in this type.
    pub fn encode(self, x: f32) -> u16 {
        match self {
            Dtype::Bf16 => half::bf16::from_f32(x).to_bits(),
            Dtype::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// The value of 16 bits of this type.
    pub fn decode(self, bits: u16) -> f32 {
        match self {
            Dtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
            Dtype::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }
}

/// The kernels' one argument (`FaArgs` in `flash.cu`, field for field).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FaArgs {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    allow: u64,
    dout: u64,
    delta: u64,
    dq_acc: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    batch: i32,
    heads: i32,
    kv_heads: i32,
    q_len: i32,
    k_len: i32,
    causal: i32,
    scale: f32,
    pad: f32,
}

// SAFETY: `FaArgs` is `repr(C)` plain data matching the kernels' parameter.
unsafe impl DeviceRepr for FaArgs {}

/// Kernels of one head width and element type.
struct Variant {
    fwd: CudaFunction,
    bwd: CudaFunction,
    delta: CudaFunction,
}

/// The compiled attention kernels of one device.
pub struct Flash {
    dev: Arc<Device>,
    /// `[head width 64, 128][bf16, f16]`.
    variants: [[Variant; 2]; 2],
    dq_cast: [CudaFunction; 2],
    /// `wgmma` forward and backward passes for heads of width 128 `[bf16, f16]`, on Hopper
    /// (sm_90a) only, unless `AUGUR_FLASH=mma` asks for the `mma.sync` kernels (A/B runs).
    hopper: Option<[[CudaFunction; 2]; 2]>,
    fill: CudaFunction,
    _module: Arc<CudaModule>,
}

fn fwd_smem(dim: usize) -> usize {
    (FWD_ROWS + 4 * FWD_KEYS) * (dim + 8) * 2
}

fn bwd_smem(dim: usize) -> usize {
    (2 * BWD_KEYS + 4 * BWD_ROWS) * (dim + 8) * 2 + 2 * BWD_ROWS * (BWD_KEYS + 8) * 2 + 4 * BWD_ROWS * 4
}

impl Flash {
    /// Compile (or load from the disk cache) the attention kernels for `dev`.
    pub fn new(dev: &Arc<Device>) -> Result<Self> {
        let (major, minor) = dev.ctx.compute_capability()?;
        if major < 8 {
            return Err(Error::Unsupported(format!(
                "FlashAttention needs tensor cores with bf16 (compute capability 8.0 or newer); this device is {major}.{minor}"
            )));
        }
        let module = dev.ctx.load_module(compile(&FLASH, major, minor)?)?;
        use sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
        let variant = |dim: usize, ty: &str| -> Result<Variant> {
            let name = |kind: &str| format!("fa_{kind}_d{dim}_{ty}");
            let v = Variant {
                fwd: module.load_function(&name("fwd"))?,
                bwd: module.load_function(&name("bwd"))?,
                delta: module.load_function(&name("delta"))?,
            };
            v.fwd.set_attribute(MAX_SMEM, fwd_smem(dim) as i32)?;
            v.bwd.set_attribute(MAX_SMEM, bwd_smem(dim) as i32)?;
            Ok(v)
        };
        let hopper = if (major, minor) == (9, 0) && std::env::var("AUGUR_FLASH").as_deref() != Ok("mma") {
            let f = |kind: &str, ty: &str, smem: usize| -> Result<CudaFunction> {
                let f = module.load_function(&format!("fa3_{kind}_d128_{ty}"))?;
                f.set_attribute(MAX_SMEM, smem as i32)?;
                Ok(f)
            };
            Some([[f("fwd", "bf16", F3_SMEM)?, f("fwd", "f16", F3_SMEM)?], [f("bwd", "bf16", F3B_SMEM)?, f("bwd", "f16", F3B_SMEM)?]])
        } else {
            None
        };
        Ok(Flash {
            dev: dev.clone(),
            hopper,
            variants: [[variant(64, "bf16")?, variant(64, "f16")?], [variant(128, "bf16")?, variant(128, "f16")?]],
            dq_cast: [module.load_function("fa_dq_cast_bf16")?, module.load_function("fa_dq_cast_f16")?],
            fill: module.load_function("fa_fill")?,
            _module: module,
        })
    }

    /// Which kernels compute attention over heads of width `dim`: `wgmma` (Hopper) or
    /// `mma.sync`.
    pub fn forward_kernel(&self, dim: usize) -> &'static str {
        if self.hopper.is_some() && dim == 128 {
            "wgmma"
        } else {
            "mma.sync"
        }
    }

    /// The device the kernels run on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    fn variant(&self, dim: usize, ty: Dtype) -> &Variant {
        &self.variants[usize::from(dim == 128)][ty.index()]
    }

    /// Launch `f` with its arguments, in stream order after everything queued before.
    ///
    /// # Safety
    /// `args` point at values of the kernel's parameter types, in order.
    unsafe fn launch(&self, f: &CudaFunction, (grid, threads): ((u32, u32, u32), u32), smem: usize, args: &mut [*mut c_void]) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_IGNORE;
        self.dev.launch_with(f, cfg, args, attr)
    }
}

/// Device tensors of one attention call and its gradients, for one shape: `q`, `o`, `dout`,
/// `dq` are `[batch, heads, q_len, dim]`, `k`, `v`, `dk`, `dv` `[batch, kv_heads, k_len, dim]`.
pub struct Attention {
    shape: Shape,
    causal: bool,
    ty: Dtype,
    scale: f32,
    q: Buf<u16>,
    k: Buf<u16>,
    v: Buf<u16>,
    o: Buf<u16>,
    lse: Buf<f32>,
    allow: Option<Buf<u8>>,
    dout: Buf<u16>,
    delta: Buf<f32>,
    dq_acc: Buf<f32>,
    dq: Buf<u16>,
    dk: Buf<u16>,
    dv: Buf<u16>,
}

/// Which tensor of an [`Attention`] to fill or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Queries.
    Q,
    /// Keys.
    K,
    /// Values.
    V,
    /// The forward output.
    O,
    /// The gradient arriving at the output.
    DOut,
    /// Gradients of the queries, keys, values.
    DQ,
    /// See [`Io::DQ`].
    DK,
    /// See [`Io::DQ`].
    DV,
}

impl Attention {
    /// Buffers for `shape` (head width 64 or 128), scores scaled by `scale`.
    pub fn new(f: &Flash, shape: Shape, causal: bool, ty: Dtype, scale: f32) -> Result<Self> {
        shape.check(causal).map_err(Error::Unsupported)?;
        // The forward pass takes the running maximum of the raw scores (flash.cu).
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(Error::Unsupported(format!("an attention scale of {scale}: it must be positive and finite")));
        }
        if shape.dim != 64 && shape.dim != 128 {
            return Err(Error::Unsupported(format!("FlashAttention on the device takes heads of width 64 or 128, not {}", shape.dim)));
        }
        let rows = shape.batch * shape.heads * shape.q_len;
        let keys = shape.batch * shape.kv_heads * shape.k_len;
        if rows.max(keys) * shape.dim >= i32::MAX as usize || shape.q_len * shape.k_len >= i32::MAX as usize {
            return Err(Error::Unsupported(format!("attention of {shape:?} is too large for one call: split the batch")));
        }
        let d = &f.dev;
        let (qn, kn) = (rows * shape.dim, keys * shape.dim);
        Ok(Attention {
            shape,
            causal,
            ty,
            scale,
            q: d.alloc(qn)?,
            k: d.alloc(kn)?,
            v: d.alloc(kn)?,
            o: d.alloc(qn)?,
            lse: d.alloc(rows)?,
            allow: None,
            dout: d.alloc(qn)?,
            delta: d.alloc(rows)?,
            dq_acc: d.alloc(qn)?,
            dq: d.alloc(qn)?,
            dk: d.alloc(kn)?,
            dv: d.alloc(kn)?,
        })
    }

    /// The shape the buffers hold.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    fn buf(&self, which: Io) -> &Buf<u16> {
        match which {
            Io::Q => &self.q,
            Io::K => &self.k,
            Io::V => &self.v,
            Io::O => &self.o,
            Io::DOut => &self.dout,
            Io::DQ => &self.dq,
            Io::DK => &self.dk,
            Io::DV => &self.dv,
        }
    }

    fn buf_mut(&mut self, which: Io) -> &mut Buf<u16> {
        match which {
            Io::Q => &mut self.q,
            Io::K => &mut self.k,
            Io::V => &mut self.v,
            Io::O => &mut self.o,
            Io::DOut => &mut self.dout,
            Io::DQ => &mut self.dq,
            Io::DK => &mut self.dk,
            Io::DV => &mut self.dv,
        }
    }

    /// Copy `bits` (16-bit values of the call's type) into tensor `which`.
    pub fn write(&mut self, f: &Flash, which: Io, bits: &[u16]) -> Result<()> {
        let b = self.buf_mut(which);
        if bits.len() != b.len() {
            return Err(Error::Unsupported(format!("{which:?} holds {} values, not {}", b.len(), bits.len())));
        }
        f.dev.write(b, bits)
    }

    /// Fill tensor `which` with uniform values in [-1, 1) made on the device from `seed`.
    pub fn fill(&mut self, f: &Flash, which: Io, seed: u32) -> Result<()> {
        let bf = i32::from(self.ty == Dtype::Bf16);
        let b = self.buf_mut(which);
        let (mut p, mut n, mut seed, mut bf) = (b.ptr, b.len() as u64, seed, bf);
        let mut args = [
            &mut p as *mut u64 as *mut c_void,
            &mut n as *mut u64 as *mut c_void,
            &mut seed as *mut u32 as *mut c_void,
            &mut bf as *mut i32 as *mut c_void,
        ];
        // SAFETY: `fa_fill(u16*, u64, u32, int)` over the `n` values of `b`.
        unsafe { f.launch(&f.fill, ((f.dev.sm_count as u32 * 8, 1, 1), THREADS), 0, &mut args) }
    }

    /// Restrict attention to the pairs where `allow[i * k_len + j]` is true (on top of the
    /// causal mask, if any); `None` lifts the restriction.
    pub fn set_allow(&mut self, f: &Flash, allow: Option<&[bool]>) -> Result<()> {
        self.allow = match allow {
            None => None,
            Some(a) if a.len() == self.shape.q_len * self.shape.k_len => Some(f.dev.upload(&a.iter().map(|&x| u8::from(x)).collect::<Vec<_>>())?),
            Some(a) => {
                return Err(Error::Unsupported(format!(
                    "an attention mask of {} entries for {} queries and {} keys",
                    a.len(),
                    self.shape.q_len,
                    self.shape.k_len
                )))
            }
        };
        Ok(())
    }

    /// Read tensor `which` back (16-bit values).
    pub fn read(&self, f: &Flash, which: Io) -> Result<Vec<u16>> {
        let b = self.buf(which);
        let mut v = vec![0u16; b.len()];
        f.dev.read(b, &mut v)?;
        f.dev.synchronize()?;
        Ok(v)
    }

    /// Read the forward pass's log-sum-exp of every query row.
    pub fn read_lse(&self, f: &Flash) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.lse.len()];
        f.dev.read(&self.lse, &mut v)?;
        f.dev.synchronize()?;
        Ok(v)
    }

    fn ptrs(&self) -> Ptrs {
        Ptrs {
            q: self.q.ptr,
            k: self.k.ptr,
            v: self.v.ptr,
            o: self.o.ptr,
            lse: self.lse.ptr,
            allow: self.allow.as_ref().map_or(0, |a| a.ptr),
            dout: self.dout.ptr,
            delta: self.delta.ptr,
            dq_acc: self.dq_acc.ptr,
            dq: self.dq.ptr,
            dk: self.dk.ptr,
            dv: self.dv.ptr,
        }
    }

    /// Queue `o = softmax(q kᵀ · scale + mask) v` and the rows' log-sum-exp.
    pub fn forward(&mut self, f: &Flash) -> Result<()> {
        // SAFETY: the buffers are sized for the shape (`Attention::new`).
        unsafe { f.forward_ptrs(&self.shape, self.causal, self.ty, self.scale, &self.ptrs()) }
    }

    /// Queue the gradients of the last [`Attention::forward`] for the output gradient in
    /// [`Io::DOut`], into [`Io::DQ`], [`Io::DK`], [`Io::DV`].
    pub fn backward(&mut self, f: &Flash) -> Result<()> {
        f.dev.stream.memset_zeros(&mut self.dq_acc.slice)?;
        // SAFETY: the buffers are sized for the shape; `delta` and `dq_acc` hold every row.
        unsafe { f.backward_ptrs(&self.shape, self.causal, self.ty, self.scale, &self.ptrs()) }
    }
}

/// Device addresses of one attention call's tensors (0 for `allow`: no explicit mask). `q`,
/// `o`, `dout`, `dq` hold `[batch, heads, q_len, dim]` 16-bit values, `k`, `v`, `dk`, `dv`
/// `[batch, kv_heads, k_len, dim]`; `lse` and `delta` one f32 per query row, `dq_acc` f32 of
/// `q`'s size (zeroed before a backward pass), `allow` `q_len × k_len` bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ptrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub allow: u64,
    pub dout: u64,
    pub delta: u64,
    pub dq_acc: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
}

impl Flash {
    /// Whether the tensor-core kernels take this call: heads of width 64 or 128, a positive
    /// finite scale, and sizes that index in 32 bits.
    pub(crate) fn supports(s: &Shape, scale: f32) -> bool {
        let rows = s.batch * s.heads * s.q_len;
        let keys = s.batch * s.kv_heads * s.k_len;
        (s.dim == 64 || s.dim == 128) && scale > 0.0 && scale.is_finite() && rows.max(keys) * s.dim < i32::MAX as usize && s.q_len * s.k_len < i32::MAX as usize
    }

    fn args(s: &Shape, causal: bool, scale: f32, p: &Ptrs) -> FaArgs {
        FaArgs {
            q: p.q,
            k: p.k,
            v: p.v,
            o: p.o,
            lse: p.lse,
            allow: p.allow,
            dout: p.dout,
            delta: p.delta,
            dq_acc: p.dq_acc,
            dq: p.dq,
            dk: p.dk,
            dv: p.dv,
            batch: s.batch as i32,
            heads: s.heads as i32,
            kv_heads: s.kv_heads as i32,
            q_len: s.q_len as i32,
            k_len: s.k_len as i32,
            causal: i32::from(causal),
            scale,
            pad: 0.0,
        }
    }

    /// Queue the forward pass over the tensors at `p`.
    ///
    /// # Safety
    /// `p` holds live buffers of the sizes [`Ptrs`] describes for `s`, and [`Flash::supports`].
    pub(crate) unsafe fn forward_ptrs(&self, s: &Shape, causal: bool, ty: Dtype, scale: f32, p: &Ptrs) -> Result<()> {
        let mut a = Self::args(s, causal, scale, p);
        let mut args = [&mut a as *mut FaArgs as *mut c_void];
        if let (Some(f), 128) = (&self.hopper, s.dim) {
            let grid = (s.q_len.div_ceil(F3_ROWS) as u32, s.heads as u32, s.batch as u32);
            return self.launch(&f[0][ty.index()], (grid, F3_THREADS), F3_SMEM, &mut args);
        }
        let grid = (s.q_len.div_ceil(FWD_ROWS) as u32, s.heads as u32, s.batch as u32);
        self.launch(&self.variant(s.dim, ty).fwd, (grid, FWD_THREADS), fwd_smem(s.dim), &mut args)
    }

    /// Queue the backward pass over the tensors at `p` (`dq_acc` zeroed).
    ///
    /// # Safety
    /// As [`Flash::forward_ptrs`].
    pub(crate) unsafe fn backward_ptrs(&self, s: &Shape, causal: bool, ty: Dtype, scale: f32, p: &Ptrs) -> Result<()> {
        let v = self.variant(s.dim, ty);
        let mut a = Self::args(s, causal, scale, p);
        let rows = s.batch * s.heads * s.q_len;
        let mut args = [&mut a as *mut FaArgs as *mut c_void];
        let warps = THREADS as usize / 32;
        self.launch(&v.delta, ((rows.div_ceil(warps) as u32, 1, 1), THREADS), 0, &mut args)?;
        if let (Some(f), 128) = (&self.hopper, s.dim) {
            let grid = (s.k_len.div_ceil(F3_KEYS) as u32, s.kv_heads as u32, s.batch as u32);
            self.launch(&f[1][ty.index()], (grid, F3_THREADS), F3B_SMEM, &mut args)?;
        } else {
            self.launch(&v.bwd, ((s.k_len.div_ceil(BWD_KEYS) as u32, s.kv_heads as u32, s.batch as u32), THREADS), bwd_smem(s.dim), &mut args)?;
        }
        let mut n = (rows * s.dim) as u64;
        let mut cast_args = [&mut a as *mut FaArgs as *mut c_void, &mut n as *mut u64 as *mut c_void];
        self.launch(&self.dq_cast[ty.index()], ((self.dev.sm_count as u32 * 8, 1, 1), THREADS), 0, &mut cast_args)
    }
}

/// Floating-point operations of one forward pass (two matrix products of `2·q·k·d` each per
/// head), halved for a causal mask as FlashAttention's benchmarks count them. The backward pass
/// does 2.5 times as many (five products).
pub fn forward_flops(s: &Shape, causal: bool) -> f64 {
    let full = 4.0 * (s.batch * s.heads) as f64 * s.q_len as f64 * s.k_len as f64 * s.dim as f64;
    if causal {
        full / 2.0
    } else {
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_argument_layout_matches_flash_cu() {
        // flash.cu: FaArgs is 12 pointers, 6 ints and 2 floats.
        assert_eq!(std::mem::size_of::<FaArgs>(), 12 * 8 + 8 * 4);
        assert_eq!(std::mem::offset_of!(FaArgs, batch), 12 * 8);
        assert_eq!(std::mem::offset_of!(FaArgs, scale), 12 * 8 + 6 * 4);
    }

    #[test]
    fn flops_follow_the_flashattention_convention() {
        // B=4, H=32, S=4096, D=128, causal: 4·4·32·4096²·128 / 2 = 2.2e12.
        let s = Shape { batch: 4, heads: 32, kv_heads: 32, q_len: 4096, k_len: 4096, dim: 128 };
        assert_eq!(forward_flops(&s, true), 4.0 * 4.0 * 32.0 * 4096.0 * 4096.0 * 128.0 / 2.0);
        assert_eq!(forward_flops(&s, false), 2.0 * forward_flops(&s, true));
    }
}
