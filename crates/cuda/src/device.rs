//! Opening a device and compiling the kernels.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// What can go wrong on the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No driver library: not an NVIDIA machine, or the driver is not installed.
    #[error("no CUDA driver: libcuda.so could not be loaded; run on a machine with an NVIDIA driver, or drop `--device cuda`")]
    NoDriver,
    /// NVRTC, which compiles the kernels, is missing.
    #[error("NVRTC (libnvrtc.so) could not be loaded; put the CUDA toolkit's lib directory on LD_LIBRARY_PATH")]
    NoNvrtc,
    /// The ordinal names no device.
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// The kernels did not compile.
    #[error("NVRTC could not compile augur's kernels ({0})")]
    Compile(String),
    /// NCCL is missing, or a collective or the rendezvous failed.
    #[error("NCCL: {0}")]
    Nccl(String),
    /// A shape or type the CUDA kernels do not handle.
    #[error("{0}")]
    Unsupported(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Block types in kernel order: `matvec_<name>`, `matmul_<name>`, `embed_<name>`.
pub(crate) const TYPE_NAMES: [&str; 11] = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"];

/// Most dynamic shared memory a matrix-vector launch may take (its input, `n × k` f32).
pub(crate) const MATVEC_SMEM: usize = 160 * 1024;

pub(crate) struct Kernels {
    pub matvec: Vec<CudaFunction>,
    pub matmul: Vec<CudaFunction>,
    pub embed: Vec<CudaFunction>,
    pub qkv_rope: Vec<CudaFunction>,
    pub rms_norm: CudaFunction,
    pub silu_mul: CudaFunction,
    pub rope_kv: CudaFunction,
    pub attn: CudaFunction,
    pub argmax: CudaFunction,
    pub keep_rows: CudaFunction,
    pub decode_step: CudaFunction,
}

/// One CUDA device: context, the stream every launch goes to, and the compiled kernels.
pub struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) k: Kernels,
    _module: Arc<CudaModule>,
    name: String,
    /// Streaming multiprocessors.
    pub(crate) sm_count: usize,
    /// Launch with programmatic dependent launch (compute capability 9.0 and up, unless
    /// `AUGUR_CUDA_PDL=0`).
    pub(crate) pdl: bool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({} #{})", self.name, self.ctx.ordinal())
    }
}

/// One NVRTC program: its name in the disk cache, and its source.
pub(crate) struct Program {
    pub name: &'static str,
    pub source: &'static str,
}

/// The inference kernels, then the persistent decode step that reuses their helpers.
pub(crate) const KERNELS: Program = Program { name: "kernels", source: concat!(include_str!("kernels.cu"), include_str!("decode.cu")) };

impl Device {
    /// Open device `ordinal` and compile (or load from the cache) the kernels for it.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: these only try to load the libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, used in order: the per-buffer events cudarc records for multi-stream
        // safety would only cost time (and would land in captured graphs).
        // SAFETY: every launch and copy of this crate goes through `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        let ptx = compile(&KERNELS, major, minor)?;
        let module = ctx.load_module(ptx)?;
        let f = |name: &str| module.load_function(name);
        let per_type = |prefix: &str| TYPE_NAMES.iter().map(|t| f(&format!("{prefix}_{t}"))).collect::<std::result::Result<Vec<_>, _>>();
        let k = Kernels {
            matvec: per_type("matvec")?,
            matmul: per_type("matmul")?,
            embed: per_type("embed")?,
            qkv_rope: per_type("qkv_rope")?,
            rms_norm: f("rms_norm")?,
            silu_mul: f("silu_mul")?,
            rope_kv: f("rope_kv")?,
            attn: f("attn")?,
            argmax: f("argmax")?,
            keep_rows: f("keep_rows")?,
            decode_step: f("decode_step")?,
        };
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
        for mv in k.matvec.iter().chain(&k.qkv_rope).chain([&k.decode_step]) {
            mv.set_attribute(MAX_SMEM, MATVEC_SMEM as i32)?;
        }
        let name = ctx.name()?;
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as SMS;
        let sm_count = ctx.attribute(SMS)?.max(1) as usize;
        let pdl = major >= 9 && std::env::var("AUGUR_CUDA_PDL").map_or(true, |v| v != "0");
        Ok(Arc::new(Device { ctx, stream, k, _module: module, name, sm_count, pdl }))
    }

    /// The device's name (`NVIDIA H200`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SM clock in kHz, as the device reports it.
    pub(crate) fn clock_khz(&self) -> Result<f64> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE;
        Ok(self.ctx.attribute(CU_DEVICE_ATTRIBUTE_CLOCK_RATE)? as f64)
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    pub(crate) fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<Buf<T>> {
        Buf::new(self.stream.alloc_zeros::<T>(len.max(1))?, &self.stream)
    }

    pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, v: &[T]) -> Result<Buf<T>> {
        if v.is_empty() {
            return self.alloc(1);
        }
        Buf::new(self.stream.clone_htod(v)?, &self.stream)
    }

    pub(crate) fn write<T: DeviceRepr>(&self, dst: &mut Buf<T>, src: &[T]) -> Result<()> {
        let mut view = dst.slice.slice_mut(..src.len());
        Ok(self.stream.memcpy_htod(src, &mut view)?)
    }

    pub(crate) fn read<T: DeviceRepr>(&self, src: &Buf<T>, dst: &mut [T]) -> Result<()> {
        self.read_at(src, 0, dst)
    }

    /// Copy `dst.len()` elements from element `at` of `src`.
    pub(crate) fn read_at<T: DeviceRepr>(&self, src: &Buf<T>, at: usize, dst: &mut [T]) -> Result<()> {
        let view = src.slice.slice(at..at + dst.len());
        Ok(self.stream.memcpy_dtoh(&view, dst)?)
    }
}

/// A device buffer and its raw address (what the kernels take).
pub(crate) struct Buf<T> {
    pub slice: CudaSlice<T>,
    pub ptr: u64,
}

impl<T> Buf<T> {
    fn new(slice: CudaSlice<T>, stream: &CudaStream) -> Result<Self> {
        let ptr = slice.device_ptr(stream).0;
        Ok(Buf { slice, ptr })
    }

    pub(crate) fn len(&self) -> usize {
        self.slice.len()
    }

    /// Address of element `i`.
    pub(crate) fn at(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
}

/// PTX of `program` for compute capability `major.minor`, from the disk cache when the same
/// source was compiled before.
pub(crate) fn compile(program: &Program, major: i32, minor: i32) -> Result<Ptx> {
    let arch = arch(major, minor);
    let defines = std::env::var("AUGUR_CUDA_DEFINES").unwrap_or_default();
    let mut h = DefaultHasher::new();
    (program.source, &arch, &defines, env!("CARGO_PKG_VERSION")).hash(&mut h);
    let cached = cache_dir().map(|d| d.join(format!("{}-{arch}-{:016x}.ptx", program.name, h.finish())));
    if let Some(src) = cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(Ptx::from_src(src));
    }
    let ptx = compile_uncached(program, &arch)?;
    if let Some(p) = cached {
        // A cache that cannot be written only costs the next start a compile.
        let _ = p.parent().map(std::fs::create_dir_all);
        let _ = std::fs::write(&p, ptx.to_src());
    }
    Ok(ptx)
}

/// NVRTC's target for compute capability `major.minor`: Hopper (9.0) gets `sm_90a`, whose
/// `wgmma` instructions the FlashAttention forward pass uses (`flash90.cu`).
pub(crate) fn arch(major: i32, minor: i32) -> String {
    let suffix = if (major, minor) == (9, 0) { "a" } else { "" };
    format!("sm_{major}{minor}{suffix}")
}

/// Compile every NVRTC program of this crate for compute capability `major.minor` into the disk
/// cache (`$AUGUR_CACHE/cuda`), without a device: a machine whose first start should not wait
/// for NVRTC can receive the cache ready (NVRTC must be no newer than the target's driver).
pub fn warm_cache(major: i32, minor: i32) -> Result<()> {
    for p in [&KERNELS, &crate::flash::FLASH, &crate::train::TRAIN] {
        compile(p, major, minor)?;
    }
    Ok(())
}

/// Compile `program` for `arch` (`sm_90`) with NVRTC; needs NVRTC but no device.
pub(crate) fn compile_uncached(program: &Program, arch: &str) -> Result<Ptx> {
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::NoNvrtc);
    }
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    // Tuning knobs of kernels.cu (`-DPRE=2 -DMV_MIN_BLOCKS=4`), for A/B runs.
    options.extend(std::env::var("AUGUR_CUDA_DEFINES").unwrap_or_default().split_whitespace().map(str::to_owned));
    let opts = CompileOptions { options, ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(program.source, opts).map_err(|e| Error::Compile(format!("{}: {e}", program.name)))
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("AUGUR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("augur")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/augur")))?;
    Some(base.join("cuda"))
}
