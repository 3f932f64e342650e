//! The persistent decode step (`decode.cu`): one cooperative launch per greedy token.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::DeviceRepr;

use crate::device::{Buf, Device};
use crate::ops::{bytes_of, grid1};
use crate::{Error, Result};

/// Threads per block of `decode_step` (`DK_THREADS`).
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;

/// One decoder block for the kernel (`DLayer` in `decode.cu`, field for field): device
/// addresses of the norms, the seven matrices (q, k, v, o, gate, up, down), the q/k/v biases
/// (0 for none) and this sequence's caches; the matrices' block types.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DLayer {
    pub attn_norm: u64,
    pub ffn_norm: u64,
    pub w: [u64; 7],
    pub bias: [u64; 3],
    pub kc: u64,
    pub vc: u64,
    pub ty: [i32; 7],
    pub pad: i32,
}

/// The kernel's one argument (`DModel` in `decode.cu`, field for field).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DModel {
    pub layers: u64,
    pub embed: u64,
    pub out: u64,
    pub norm: u64,
    pub rope: u64,
    pub x: u64,
    pub q: u64,
    pub att: u64,
    pub h: u64,
    pub logits: u64,
    pub po: u64,
    pub pml: u64,
    pub best_v: u64,
    pub best_i: u64,
    pub ids: u64,
    pub meta: u64,
    pub tokens: u64,
    pub bar: u64,
    pub dim: i32,
    pub hidden: i32,
    pub nh: i32,
    pub nkv: i32,
    pub hd: i32,
    pub vocab: i32,
    pub n_layer: i32,
    pub interleaved: i32,
    pub t_embed: i32,
    pub t_out: i32,
    pub timing: u64,
    pub eps: f32,
    pub scale: f32,
    /// Bytes of weights each warp stages in shared memory per buffer (0: none).
    pub stage: i32,
    pub pad: i32,
}

// SAFETY: `DModel` is `repr(C)` plain data matching the kernel's parameter.
unsafe impl DeviceRepr for DModel {}

/// A sequence's state for the persistent step: the block table (with its cache addresses), the
/// per-block argmax partials, the barrier counters and the generated ids.
pub(crate) struct Persistent {
    pub layers: Buf<u8>,
    pub best_v: Buf<f32>,
    pub best_i: Buf<i32>,
    pub bar: Buf<u32>,
    pub tokens: Buf<i32>,
    /// Attention partials per head and 32-key chunk: outputs `[head][chunk][hd]`, (max, sum).
    pub po: Buf<f32>,
    pub pml: Buf<f32>,
    /// Block 0's clock at each phase boundary of the last step (`AUGUR_CUDA_TIMING=1`).
    pub timing: Option<Buf<i64>>,
    pub grid: u32,
    pub smem: usize,
    /// `DModel::stage`.
    pub stage: usize,
}

/// Bytes of a phase's weight rows a warp copies into shared memory ahead of the phase, per
/// buffer (two per warp): enough for the default model's busiest phase (two gate/up pairs of
/// 360-byte rows). `AUGUR_CUDA_STAGE=N` sets it, 0 turning staging off (A/B runs).
const STAGE: usize = 2048;

/// What block 0 stamps the clock after, per decoder block (`STAMP` in decode.cu): each weight
/// phase queues the next phase's staged weights (".stage"), builds its input (".in", or
/// ".merge" of the attention partials), waits for its staged weights (".wait") and does its
/// rows; each phase ends with a grid barrier ("wait").
const PHASES: [&str; 22] = [
    "q.stage", "q.in", "q.wait", "qkv", "wait", "attn", "wait", "o.stage", "o.merge", "o.wait", "o", "wait", "g.stage", "g.in",
    "g.wait", "gate/up", "wait", "d.stage", "d.in", "d.wait", "down", "wait",
];

/// Clock stamps of one step: the start, `PHASES` per block, the head's end.
pub(crate) fn stamps(n_layer: usize) -> usize {
    2 + PHASES.len() * n_layer
}

/// Mean time of each phase over the blocks, from one step's stamps, as one line.
pub(crate) fn timing_report(t: &[i64], n_layer: usize, clock_khz: f64) -> String {
    let us = |c: i64| c as f64 / clock_khz * 1e3;
    let mut sums = [0i64; PHASES.len()];
    for l in 0..n_layer {
        for (p, s) in sums.iter_mut().enumerate() {
            let i = 1 + PHASES.len() * l + p;
            *s += t[i] - t[i - 1];
        }
    }
    let phases: Vec<String> = PHASES.iter().zip(sums).map(|(n, s)| format!("{n} {:.2}", us(s) / n_layer as f64)).collect();
    let last = t.len() - 1;
    format!("persistent step (block 0, µs at {:.0} MHz): per block: {}; head {:.2}; total {:.1}", clock_khz / 1e3, phases.join(", "), us(t[last] - t[last - 1]), us(t[last] - t[0]))
}

impl Persistent {
    /// State for `layers` on `dev`, with `floats` of shared memory per block, for `heads`
    /// query heads of width `hd` over `context` positions.
    pub(crate) fn new(dev: &Device, layers: &[DLayer], floats: usize, heads: usize, hd: usize, context: usize) -> Result<Self> {
        let chunks = heads * context.div_ceil(32);
        let n_layer = layers.len();
        let stage = std::env::var("AUGUR_CUDA_STAGE").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(STAGE).next_multiple_of(16);
        // The buffers start at the next 16-byte boundary after the floats.
        let smem = floats * 4 + 16 + WARPS * 2 * stage;
        let f = &dev.k.decode_step;
        let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)?;
        if per_sm == 0 {
            return Err(Error::Unsupported(format!("the persistent decode step does not fit an SM with {smem} bytes of shared memory")));
        }
        // AUGUR_CUDA_GRID=B: B blocks per SM (at most what fits), for A/B runs.
        let want = std::env::var("AUGUR_CUDA_GRID").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(per_sm);
        let grid = want.clamp(1, per_sm) * dev.sm_count as u32;
        let timing = match std::env::var("AUGUR_CUDA_TIMING") {
            Ok(v) if v == "1" => Some(dev.alloc(stamps(n_layer))?),
            _ => None,
        };
        Ok(Persistent {
            layers: dev.upload(bytes_of(layers))?,
            best_v: dev.alloc(grid as usize)?,
            best_i: dev.alloc(grid as usize)?,
            bar: dev.alloc(2)?,
            tokens: dev.alloc(1)?,
            po: dev.alloc(chunks * hd)?,
            pml: dev.alloc(chunks * 2)?,
            timing,
            grid,
            smem,
            stage,
        })
    }
}

impl Device {
    /// Queue one persistent decode step. Every block must be resident at once (the kernel's
    /// barriers wait for all of them), so the launch is cooperative: the driver refuses a grid
    /// that does not fit rather than letting it hang.
    ///
    /// # Safety
    /// Every address in `m` is sized for the model it describes (see `decode.cu`).
    pub(crate) unsafe fn decode_step(&self, m: &DModel, p: &Persistent) -> Result<()> {
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
        attr.value.cooperative = 1;
        let mut args = [m as *const DModel as *mut c_void];
        self.launch_with(&self.k.decode_step, grid1(p.grid as usize, THREADS, p.smem), &mut args, attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_argument_layouts_match_decode_cu() {
        // decode.cu: DLayer is 14 pointers and 8 ints; DModel 18 pointers, 10 ints, the timing
        // pointer, 2 floats and 2 ints (NVRTC reports its parameter as 208 bytes).
        assert_eq!(std::mem::size_of::<DLayer>(), 14 * 8 + 8 * 4);
        assert_eq!(std::mem::size_of::<DModel>(), 208);
        assert_eq!(std::mem::offset_of!(DModel, dim), 18 * 8);
        assert_eq!(std::mem::offset_of!(DModel, timing), 18 * 8 + 10 * 4);
        assert_eq!(std::mem::offset_of!(DModel, stage), 18 * 8 + 10 * 4 + 8 + 2 * 4);
        assert_eq!(std::mem::offset_of!(DLayer, ty), 14 * 8);
    }

    #[test]
    fn timing_report_averages_each_phase_over_the_blocks() {
        // Two blocks; every phase of block 0 takes 1000 cycles, of block 1 3000; the head 500.
        let mut t = vec![0i64];
        for l in 0..2 {
            for _ in 0..PHASES.len() {
                let last = *t.last().unwrap();
                t.push(last + if l == 0 { 1000 } else { 3000 });
            }
        }
        t.push(t.last().unwrap() + 500);
        assert_eq!(t.len(), stamps(2));
        // At 1 GHz (1e6 kHz) a cycle is a nanosecond: each phase averages 2 µs.
        let r = timing_report(&t, 2, 1e6);
        assert!(r.contains("q.stage 2.00, q.in 2.00, q.wait 2.00, qkv 2.00, wait 2.00, attn 2.00"), "{r}");
        assert!(r.contains("head 0.50; total 88.5"), "{r}");
    }
}
