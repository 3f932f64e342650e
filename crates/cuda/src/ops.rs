//! Launches of the kernels in `kernels.cu`, on raw device addresses.
//!
//! Every function here is `unsafe`: the kernels trust their addresses and sizes. The callers
//! ([`crate::GpuModel`] and the conformance tests) own the buffers and size them.

use augur_kernels::matmul::{Matrix, Weights};
use augur_kernels::quant::QuantType;
use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};

use crate::device::{Buf, Device, MATVEC_SMEM};
use crate::{Error, Result};

/// Tokens one matrix-vector launch handles (`MAX_TOK` in the kernels); more take the tiled
/// matrix-matrix kernel.
pub(crate) const MAX_TOK: usize = 8;
/// Keys per attention split.
pub(crate) const ATT_SPAN: usize = 128;
const ATT_WARPS: u32 = 4;

/// A weight matrix on the device, in its own block layout.
pub struct DevMat {
    /// Index into [`crate::device::TYPE_NAMES`].
    pub(crate) ty: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub k: usize,
    buf: Buf<u8>,
}

impl DevMat {
    /// Device address of the first row.
    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr
    }
}

fn type_index(w: &Weights) -> usize {
    match w {
        Weights::F32(_) => 0,
        Weights::F16(_) => 1,
        Weights::BF16(_) => 2,
        Weights::Quant(q, _) => match q {
            QuantType::Q4_0 => 3,
            QuantType::Q4_1 => 4,
            QuantType::Q5_0 => 5,
            QuantType::Q5_1 => 6,
            QuantType::Q8_0 => 7,
            QuantType::Q4_K => 8,
            QuantType::Q5_K => 9,
            QuantType::Q6_K => 10,
        },
    }
}

pub(crate) fn bytes_of<T>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data element types without padding (f32, f16, bf16, u8, `DLayer`), read
    // as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Kernel arguments for up to three matrices sharing one input (`Segs` in the kernels).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Segs {
    w: [u64; 3],
    y: [u64; 3],
    bias: [u64; 3],
    rows: [i32; 3],
    nseg: i32,
}

// SAFETY: `Segs` is `repr(C)` and matches the kernels' struct field for field.
unsafe impl DeviceRepr for Segs {}

/// What a matrix-vector launch multiplies: the input itself, or a transform of it computed in
/// shared memory on the way in.
#[derive(Clone, Copy)]
pub(crate) enum Input {
    Plain,
    /// RMSNorm with weight `w` (device address).
    Norm { w: u64, eps: f32 },
    /// `silu(x) * up` (SwiGLU), `up` a device address.
    SiluMul { up: u64 },
}

/// Addresses of a kernel's arguments, in order (what `cuLaunchKernelEx` takes).
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$((&$a) as *const _ as *mut c_void),*] };
}

pub(crate) fn grid1(blocks: usize, threads: u32, smem: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 }
}

impl Device {
    /// Launch `f` on the stream, with programmatic dependent launch where the device has it
    /// (the kernels load only weights before `griddepcontrol.wait`).
    ///
    /// # Safety
    /// `args` point at values of the kernel's parameter types, in order.
    unsafe fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = self.pdl as i32;
        self.launch_with(f, cfg, args, attr)
    }

    /// Launch `f` on the stream with one launch attribute.
    ///
    /// # Safety
    /// `args` point at values of the kernel's parameter types, in order.
    pub(crate) unsafe fn launch_with(&self, f: &CudaFunction, cfg: LaunchConfig, args: &mut [*mut c_void], mut attr: sys::CUlaunchAttribute) -> Result<()> {
        let conf = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread()?;
        sys::cuLaunchKernelEx(&conf, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()).result()?;
        Ok(())
    }

    /// Copy `m` to the device as it is stored.
    pub fn upload_matrix(&self, m: &Matrix) -> Result<DevMat> {
        if m.k % 32 != 0 {
            return Err(Error::Unsupported(format!("matrix rows of {} weights: the CUDA kernels need a multiple of 32", m.k)));
        }
        let bytes = match m.weights {
            Weights::F32(w) => bytes_of(w),
            Weights::F16(w) => bytes_of(w),
            Weights::BF16(w) => bytes_of(w),
            Weights::Quant(_, w) => w,
        };
        // Padded to 16 bytes: the persistent step copies rows as the 16-byte-aligned spans that
        // hold them (`stage_phase` in decode.cu), so the last row's span may pass its end.
        let buf = if bytes.len() % 16 == 0 {
            self.upload(bytes)?
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(16), 0);
            self.upload(&padded)?
        };
        Ok(DevMat { ty: type_index(&m.weights), rows: m.rows, k: m.k, buf })
    }

    /// Whether one matrix-vector launch can take `n` tokens of width `k`.
    pub(crate) fn matvec_fits(n: usize, k: usize) -> bool {
        n <= MAX_TOK && n * k * 4 <= MATVEC_SMEM
    }

    /// `y_i[t] (+)= W_i · input(x[t]) (+ bias_i)` for the matrices of `segs` (same type and
    /// width), `n` tokens (see [`Device::matvec_fits`]).
    ///
    /// # Safety
    /// `x` holds `n × k` f32 (and `up` too for [`Input::SiluMul`]); each `y` holds `n × rows`.
    pub(crate) unsafe fn matvec(&self, segs: &[(&DevMat, u64, Option<u64>)], x: u64, n: usize, input: Input, acc: bool) -> Result<()> {
        let (m0, k) = (segs[0].0, segs[0].0.k);
        debug_assert!(segs.len() <= 3 && segs.iter().all(|s| s.0.ty == m0.ty && s.0.k == k));
        let mut s = Segs { nseg: segs.len() as i32, ..Default::default() };
        for (i, (m, y, b)) in segs.iter().enumerate() {
            s.w[i] = m.buf.ptr;
            s.y[i] = *y;
            s.bias[i] = b.unwrap_or(0);
            s.rows[i] = m.rows as i32;
        }
        let total: usize = segs.iter().map(|s| s.0.rows).sum();
        let (mode, nw, eps, up) = match input {
            Input::Plain => (0i32, 0u64, 0f32, 0u64),
            Input::Norm { w, eps } => (1, w, eps, 0),
            Input::SiluMul { up } => (2, 0, 0.0, up),
        };
        // One row per warp until there are enough warps to fill the device about four times
        // over; then more rows per warp, so fewer blocks repeat the input's preparation.
        let rpw = (total / (self.sm_count * 8 * 16)).max(1);
        let cfg = grid1(total.div_ceil(8 * rpw), 256, n * k * 4);
        let (n, k, acc, rpw) = (n as i32, k as i32, acc as i32, rpw as i32);
        let f = &self.k.matvec[m0.ty];
        self.launch(f, cfg, &mut args![s, x, n, k, mode, nw, eps, up, acc, rpw])?;
        Ok(())
    }

    /// q, k, v of `n` tokens (see [`Device::matvec_fits`]) from RMSNorm(x) with weight `nw`, in
    /// one launch: q rotated into `q`, k rotated and v written to cache rows `meta[0] + t` of
    /// `kc`, `vc`; positions `meta[1 + t]`, RoPE table `cs` (as [`Device::rope_kv`]).
    ///
    /// # Safety
    /// `x` holds `n × k` f32, `q` `n × rows(wq)`; the caches hold row `meta[0] + n - 1`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn qkv_rope(&self, w: [(&DevMat, Option<u64>); 3], x: u64, n: usize, norm: (u64, f32), q: u64, kv: (u64, u64), meta: u64, cs: u64, hd: usize, interleaved: bool) -> Result<()> {
        let k = w[0].0.k;
        debug_assert!(w.iter().all(|(m, _)| m.ty == w[0].0.ty && m.k == k && m.rows % 2 == 0));
        let mut s = Segs { nseg: 3, ..Default::default() };
        for (i, (m, b)) in w.iter().enumerate() {
            s.w[i] = m.buf.ptr;
            s.bias[i] = b.unwrap_or(0);
            s.rows[i] = m.rows as i32;
        }
        s.y[0] = q;
        let pairs: usize = w.iter().map(|(m, _)| m.rows / 2).sum();
        let cfg = grid1(pairs.div_ceil(8), 256, n * k * 4);
        let (n, k, hd, il) = (n as i32, k as i32, hd as i32, interleaved as i32);
        let (nw, eps) = norm;
        let (kc, vc) = kv;
        self.launch(&self.k.qkv_rope[w[0].0.ty], cfg, &mut args![s, x, n, k, nw, eps, meta, cs, hd, il, kc, vc])?;
        Ok(())
    }

    /// `y[t] (+)= W · x[t] (+ bias)` for any `n`, tiled.
    ///
    /// # Safety
    /// `x` holds `n × k` f32, `y` `n × rows`.
    pub(crate) unsafe fn matmul(&self, w: &DevMat, x: u64, y: u64, bias: Option<u64>, n: usize, acc: bool) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (w.rows.div_ceil(64) as u32, n.div_ceil(64) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (b, rows, k, n, acc) = (bias.unwrap_or(0), w.rows as i32, w.k as i32, n as i32, acc as i32);
        self.launch(&self.k.matmul[w.ty], cfg, &mut args![w.buf.ptr, x, y, b, rows, k, n, acc])?;
        Ok(())
    }

    /// `out[t] = W[ids[t]]`.
    ///
    /// # Safety
    /// `ids` holds `n` valid row indices, `out` `n × k` f32.
    pub(crate) unsafe fn embed(&self, w: &DevMat, ids: u64, n: usize, out: u64) -> Result<()> {
        let k = w.k as i32;
        self.launch(&self.k.embed[w.ty], grid1(n, 128, 0), &mut args![w.buf.ptr, ids, k, out])?;
        Ok(())
    }

    /// `out[r] = RMSNorm(x[r]) * w` for `rows` rows of `k`.
    ///
    /// # Safety
    /// `x` and `out` hold `rows × k` f32, `w` `k`.
    pub(crate) unsafe fn rms_norm(&self, x: u64, w: u64, eps: f32, k: usize, rows: usize, out: u64) -> Result<()> {
        let k = k as i32;
        self.launch(&self.k.rms_norm, grid1(rows, 256, 0), &mut args![x, w, eps, k, out])?;
        Ok(())
    }

    /// `g = silu(g) * u` over `len` elements.
    ///
    /// # Safety
    /// `g` and `u` hold `len` f32.
    pub(crate) unsafe fn silu_mul(&self, g: u64, u: u64, len: usize) -> Result<()> {
        let l = len as i32;
        self.launch(&self.k.silu_mul, grid1(len.div_ceil(256), 256, 0), &mut args![g, u, l])?;
        Ok(())
    }

    /// Rotate `q` (`n × nh × hd`) and `k` by each token's position `meta[1 + t]`, with the
    /// `[position, hd / 2, (cos, sin)]` table `cs`, and write `k`, `v` to cache rows
    /// `meta[0] + t` of `kc`, `vc`.
    ///
    /// # Safety
    /// Buffers sized for `n` tokens and the cache for `meta[0] + n` rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn rope_kv(&self, q: u64, k: u64, v: u64, kc: u64, vc: u64, meta: u64, n: usize, shape: [usize; 3], cs: u64, interleaved: bool) -> Result<()> {
        let [nh, nkv, hd] = shape.map(|v| v as i32);
        let il = interleaved as i32;
        self.launch(&self.k.rope_kv, grid1(n, 128, 0), &mut args![q, k, v, kc, vc, meta, nh, nkv, hd, cs, il])?;
        Ok(())
    }

    /// Attention of `n` query tokens against the cache (`meta[0] + n` rows), causal or under a
    /// `[n, meta[0] + n]` byte mask, in `nsplit` key splits of [`ATT_SPAN`]; `po`/`pml` hold
    /// `n × nh × nsplit × (hd | 2)` partials, `counters` `n × nh` zeros (left at zero).
    ///
    /// # Safety
    /// Buffers sized as described; `nsplit × ATT_SPAN` covers `meta[0] + n`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn attention(&self, q: u64, kc: u64, vc: u64, meta: u64, n: usize, shape: [usize; 3], mask: Option<u64>, nsplit: usize, po: u64, pml: u64, counters: u64, out: u64) -> Result<()> {
        let [nh, _, hd] = shape;
        if hd % 32 != 0 || hd > 256 || shape[0] % shape[1] != 0 {
            return Err(Error::Unsupported(format!("attention with head_dim {hd} and {}/{} heads: the CUDA kernel needs a multiple of 32 up to 256", shape[0], shape[1])));
        }
        let [nh_i, nkv_i, hd_i] = shape.map(|v| v as i32);
        let (n_i, scale, mask, span) = (n as i32, 1.0f32 / (hd as f32).sqrt(), mask.unwrap_or(0), ATT_SPAN as i32);
        let cfg = LaunchConfig { grid_dim: ((n * nh) as u32, nsplit as u32, 1), block_dim: (32 * ATT_WARPS, 1, 1), shared_mem_bytes: 0 };
        self.launch(&self.k.attn, cfg, &mut args![q, kc, vc, meta, n_i, nh_i, nkv_i, hd_i, scale, mask, span, po, pml, counters, out])?;
        Ok(())
    }

    /// `out[r]` = index of the largest of row `r`'s `k` values (the first among ties).
    ///
    /// # Safety
    /// `x` holds `rows × k` f32, `out` `rows` i32.
    pub(crate) unsafe fn argmax(&self, x: u64, rows: usize, k: usize, out: u64) -> Result<()> {
        let k = k as i32;
        self.launch(&self.k.argmax, grid1(rows, 1024, 0), &mut args![x, k, out])?;
        Ok(())
    }

    /// Move cache rows `base + keep[i]` to `base + i`, in order.
    ///
    /// # Safety
    /// `keep` holds `nkeep` i32; the caches hold the rows named.
    pub(crate) unsafe fn keep_rows(&self, kc: u64, vc: u64, keep: u64, nkeep: usize, base: usize, kvd: usize) -> Result<()> {
        let (nk, b, d) = (nkeep as i32, base as i32, kvd as i32);
        self.launch(&self.k.keep_rows, grid1(1, 256, 0), &mut args![kc, vc, keep, nk, b, d])?;
        Ok(())
    }
}
