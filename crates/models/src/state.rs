//! The mutable run state of one sequence: KV cache and scratch buffers.
//!
//! Buffers only grow; after the first step at a given batch size, a forward pass allocates nothing.

use augur_kernels::actq::{ActQ, Format};
use augur_kernels::attention::{attention, quantize_row, Cache, Mask, Shape};
use augur_kernels::matmul::ACTQ_MAX_BATCH;

use crate::Config;

/// How matmul inputs (activations) are represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32 everywhere; weights are dequantized in registers (`--exact`).
    F32,
    /// One i16 per value with a scale per 32 (16 bits) in matmuls of up to `ACTQ_MAX_BATCH`
    /// tokens on Q4_0/Q4_1/Q8_0 weights: logits within ~1e-2 of f32 (llama.cpp's 8-bit scheme:
    /// ~0.5). The default: the fastest kernels on AVX2 and on AVX-512.
    I16,
    /// Three int8 planes (about 22 bits), same matmuls: logits within ~1e-4 of f32, at about
    /// two thirds of i16's decode speed (AVX-512 VNNI kernels; AVX2 ones elsewhere).
    I22,
}

impl Default for Activations {
    /// The integer format with the faster kernels on this CPU.
    fn default() -> Self {
        match Format::native() {
            Format::Planes => Activations::I22,
            Format::Wide => Activations::I16,
        }
    }
}

impl Activations {
    /// Whether the KV cache holds 16-bit rows (the 16-bit integer path, whose logits are
    /// within ~1e-2 anyway: half the bytes a decode step streams from the cache) rather than f32.
    pub fn int_kv(self) -> bool {
        self == Activations::I16
    }

    /// The quantized format of the integer path, or `None` for f32.
    pub fn format(self) -> Option<Format> {
        match self {
            Activations::F32 => None,
            Activations::I16 => Some(Format::Wide),
            Activations::I22 => Some(Format::Planes),
        }
    }
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Activations::F32),
            "i16" => Ok(Activations::I16),
            "i22" => Ok(Activations::I22),
            "auto" => Ok(Activations::default()),
            _ => Err(format!("unknown activation precision `{s}` (auto, i16, i22, f32)")),
        }
    }
}

/// Keys and values of one layer for every position so far, `[seq, n_kv_head, head_dim]` each,
/// as f32 or as 16-bit rows of `head_dim` with a scale per row ([`quantize_row`]).
#[derive(Debug, Default, Clone)]
pub(crate) struct Rows<T> {
    k: Vec<T>,
    v: Vec<T>,
    /// `[seq, n_kv_head]` row scales (all 1 for f32 rows).
    k_scales: Vec<f32>,
    v_scales: Vec<f32>,
}

/// What a cache row is stored as.
pub(crate) trait Elem: Copy + Default {
    /// Store `x` into `out` (same length), returning the scale to multiply back (1 for f32).
    fn store(x: &[f32], out: &mut [Self]) -> f32;
    /// The stored value back as f32, given its row's scale.
    fn load(self, scale: f32) -> f32;
}

impl Elem for f32 {
    fn store(x: &[f32], out: &mut [f32]) -> f32 {
        out.copy_from_slice(x);
        1.0
    }
    fn load(self, _: f32) -> f32 {
        self
    }
}

impl Elem for i16 {
    fn store(x: &[f32], out: &mut [i16]) -> f32 {
        quantize_row(x, out)
    }
    fn load(self, scale: f32) -> f32 {
        self as f32 * scale
    }
}

impl<T: Elem> Rows<T> {
    /// Write new positions' keys/values at `pos0..` (dropping anything cached past `pos0`).
    fn append(&mut self, pos0: usize, head_dim: usize, kv_dim: usize, k: &[f32], v: &[f32]) {
        let heads = kv_dim / head_dim;
        for (vals, scales, x) in [(&mut self.k, &mut self.k_scales, k), (&mut self.v, &mut self.v_scales, v)] {
            vals.truncate(pos0 * kv_dim);
            scales.truncate(pos0 * heads);
            let at = vals.len();
            vals.resize(at + x.len(), T::default());
            for (row, out) in x.chunks_exact(head_dim).zip(vals[at..].chunks_exact_mut(head_dim)) {
                scales.push(T::store(row, out));
            }
        }
    }

    /// The same rows in another element type, with room for as many positions.
    fn convert<U: Elem>(&self, head_dim: usize) -> Rows<U> {
        let conv = |vals: &Vec<T>, scales: &Vec<f32>| {
            let (mut out, mut out_scales) = (vec![U::default(); vals.len()], Vec::with_capacity(scales.capacity()));
            out.reserve(vals.capacity() - vals.len());
            let mut f = vec![0f32; head_dim];
            for ((row, &s), o) in vals.chunks_exact(head_dim).zip(scales).zip(out.chunks_exact_mut(head_dim)) {
                f.iter_mut().zip(row).for_each(|(x, e)| *x = e.load(s));
                out_scales.push(U::store(&f, o));
            }
            (out, out_scales)
        };
        let ((k, k_scales), (v, v_scales)) = (conv(&self.k, &self.k_scales), conv(&self.v, &self.v_scales));
        Rows { k, v, k_scales, v_scales }
    }

    /// Copy position `src` to position `dst` (`per` values and `heads` scales each).
    fn move_row(&mut self, per: usize, heads: usize, src: usize, dst: usize) {
        self.k.copy_within(src * per..(src + 1) * per, dst * per);
        self.v.copy_within(src * per..(src + 1) * per, dst * per);
        self.k_scales.copy_within(src * heads..(src + 1) * heads, dst * heads);
        self.v_scales.copy_within(src * heads..(src + 1) * heads, dst * heads);
    }

    fn reserve(&mut self, values: usize, scales: usize) {
        self.k.reserve(values.saturating_sub(self.k.len()));
        self.v.reserve(values.saturating_sub(self.v.len()));
        self.k_scales.reserve(scales.saturating_sub(self.k_scales.len()));
        self.v_scales.reserve(scales.saturating_sub(self.v_scales.len()));
    }

    /// The first `n` values of each, as f32.
    fn widened(&self, n: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
        let n = n.min(self.k.len());
        let load = |vals: &[T], scales: &[f32]| vals[..n].iter().enumerate().map(|(i, e)| e.load(scales[i / head_dim])).collect();
        (load(&self.k, &self.k_scales), load(&self.v, &self.v_scales))
    }
}

/// One layer's cache: 16-bit rows on the 16-bit integer path ([`Activations::int_kv`]), else f32.
#[derive(Debug, Clone)]
pub(crate) enum LayerCache {
    F32(Rows<f32>),
    I16(Rows<i16>),
}

/// `$body` with `$r` bound to the rows of `$cache`, whichever their element type.
macro_rules! on_rows {
    ($cache:expr, $r:ident => $body:expr) => {
        match $cache {
            LayerCache::F32($r) => $body,
            LayerCache::I16($r) => $body,
        }
    };
}

impl LayerCache {
    /// An empty cache of 16-bit rows (`int`) or f32.
    fn new(int: bool) -> Self {
        if int {
            LayerCache::I16(Rows::default())
        } else {
            LayerCache::F32(Rows::default())
        }
    }

    /// Holds 16-bit rows (`int`) or f32 from now on; cached rows are converted if need be.
    fn set_int(&mut self, int: bool, head_dim: usize) {
        match (&*self, int) {
            (LayerCache::F32(r), true) => *self = LayerCache::I16(r.convert(head_dim)),
            (LayerCache::I16(r), false) => *self = LayerCache::F32(r.convert(head_dim)),
            _ => {}
        }
    }

    /// Store the keys and values of `pos0..pos0 + n` (`[n, kv_dim]` each, dropping anything
    /// cached past `pos0`), then attention of `q` (`[n, n_head, head_dim]`) over the first
    /// `pos0 + n` positions into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn append_and_attend(&mut self, pos0: usize, k: &[f32], v: &[f32], q: &[f32], shape: Shape, mask: Mask, scale: f32, out: &mut [f32]) {
        let kv_dim = shape.n_kv_head * shape.head_dim;
        let seq = pos0 + k.len() / kv_dim;
        let cache = match self {
            LayerCache::F32(r) => {
                r.append(pos0, shape.head_dim, kv_dim, k, v);
                Cache::F32 { k: &r.k, v: &r.v }
            }
            LayerCache::I16(r) => {
                r.append(pos0, shape.head_dim, kv_dim, k, v);
                Cache::I16 { k: &r.k, v: &r.v, k_scales: &r.k_scales, v_scales: &r.v_scales }
            }
        };
        attention(q, cache, seq, shape, mask, scale, out);
    }

    /// Keys held, in values (as many values are held).
    fn len(&self) -> usize {
        on_rows!(self, r => r.k.len())
    }
}

/// Per-sequence state for [`crate::Llama::forward`].
#[derive(Debug)]
pub struct State {
    /// Number of positions in the KV cache.
    pub(crate) pos: usize,
    /// Floats per position per layer in the cache (`n_kv_head * head_dim`).
    kv_dim: usize,
    /// Model width.
    dim: usize,
    head_dim: usize,
    pub(crate) kv: Vec<LayerCache>,
    /// Scratch, each `[n_tok, …]`: residual stream, normed input, q, k, v, attention output,
    /// projection output, gate, up.
    pub(crate) x: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) proj: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    /// [n_tok, head_dim / 2] rope (cos, sin) per token.
    pub(crate) cs: Vec<(f32, f32)>,
    /// [n_logits, vocab]
    pub(crate) logits: Vec<f32>,
    /// [n_tok, seq] attention mask of a tree pass.
    pub(crate) mask: Vec<bool>,
    /// The current matmul input quantized for the integer path, one per token.
    pub(crate) actq: Vec<ActQ>,
    /// Rows of the last pass's final-norm output held in `xn` (see [`State::hidden`]).
    pub(crate) hidden_rows: usize,
    /// Representation of matmul inputs (see [`Activations`]).
    pub activations: Activations,
    /// The KV cache and scratch on the device, for a model moved there with
    /// [`crate::Llama::to_device`] (created by its first pass).
    #[cfg(feature = "cuda")]
    pub(crate) gpu: Option<augur_cuda::GpuSeq>,
}

fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl State {
    /// An empty state for a model of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        State {
            pos: 0,
            kv_dim: cfg.n_kv_head * cfg.head_dim,
            dim: cfg.dim,
            head_dim: cfg.head_dim,
            kv: vec![LayerCache::new(Activations::default().int_kv()); cfg.n_layer],
            x: vec![],
            xn: vec![],
            q: vec![],
            k: vec![],
            v: vec![],
            att: vec![],
            proj: vec![],
            gate: vec![],
            up: vec![],
            cs: vec![],
            logits: vec![],
            actq: Vec::new(),
            mask: Vec::new(),
            hidden_rows: 0,
            activations: Activations::default(),
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Keys and values cached for layer `layer`, `[len, n_kv_head * head_dim]` each, as f32
    /// (copies; host caches only: empty for a model on a device).
    pub fn kv(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        on_rows!(&self.kv[layer], r => r.widened(self.pos * self.kv_dim, self.head_dim))
    }

    /// The cache in the element type of `activations`, converting cached rows if it changed.
    pub(crate) fn match_kv(&mut self, activations: Activations) {
        for l in &mut self.kv {
            l.set_int(activations.int_kv(), self.head_dim);
        }
    }

    /// The final-norm hidden states of the last forward pass, `[rows, dim]`: the rows that
    /// produced logits (the last token for [`crate::Logits::Last`], every token for
    /// [`crate::Logits::All`] and [`crate::Logits::Hidden`]). Valid until the next pass.
    pub fn hidden(&self) -> &[f32] {
        &self.xn[..self.hidden_rows * self.dim]
    }

    /// Positions held in the KV cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Drop cached positions from `len` on (e.g. rejected speculative tokens).
    pub fn truncate(&mut self, len: usize) {
        self.pos = self.pos.min(len);
    }

    /// After a tree pass that appended nodes at `base..`, keep only the nodes `keep` (indices
    /// into that pass, in path order) at `base..base + keep.len()` and drop the rest: the
    /// accepted path's keys/values are moved, not recomputed.
    pub fn keep(&mut self, base: usize, keep: &[usize]) {
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            g.keep(base, keep);
            self.pos = base + keep.len();
            return;
        }
        let (per, heads) = (self.kv_dim, self.kv_dim / self.head_dim);
        for l in &mut self.kv {
            if l.len() < (base + keep.iter().max().map_or(0, |m| m + 1)) * per {
                continue; // a layer this pass did not reach (early exit) holds nothing to keep
            }
            for (dst, &src) in keep.iter().enumerate() {
                let (d, s) = (base + dst, base + src);
                if d != s {
                    on_rows!(&mut *l, r => r.move_row(per, heads, s, d));
                }
            }
        }
        self.pos = base + keep.len();
    }

    /// Reserve room for `positions` in the KV cache up front (avoids growth during decode).
    pub fn reserve(&mut self, cfg: &Config, positions: usize) {
        let per = cfg.n_kv_head * cfg.head_dim;
        for l in &mut self.kv {
            on_rows!(l, r => r.reserve(positions * per, positions * cfg.n_kv_head));
        }
    }

    /// Size the scratch buffers for a batch of `n` tokens.
    pub(crate) fn fit(&mut self, cfg: &Config, n: usize, n_logits: usize) {
        let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        fit(&mut self.x, n * cfg.dim);
        fit(&mut self.xn, n * cfg.dim);
        fit(&mut self.q, n * qd);
        fit(&mut self.k, n * kvd);
        fit(&mut self.v, n * kvd);
        fit(&mut self.att, n * qd);
        fit(&mut self.proj, n * cfg.dim);
        fit(&mut self.gate, n * cfg.hidden);
        fit(&mut self.up, n * cfg.hidden);
        fit(&mut self.logits, n_logits * cfg.vocab);
        if self.actq.len() < n.min(ACTQ_MAX_BATCH) {
            self.actq.resize(n.min(ACTQ_MAX_BATCH), ActQ::default());
        }
        if self.cs.len() < n * cfg.head_dim / 2 {
            self.cs.resize(n * cfg.head_dim / 2, (0.0, 0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_names_parse_and_auto_is_this_cpus_default() {
        assert_eq!("f32".parse::<Activations>(), Ok(Activations::F32));
        assert_eq!("i16".parse::<Activations>(), Ok(Activations::I16));
        assert_eq!("i22".parse::<Activations>(), Ok(Activations::I22));
        assert_eq!("auto".parse::<Activations>(), Ok(Activations::default()));
        let err = "i8".parse::<Activations>().unwrap_err();
        assert!(err.contains("`i8`") && err.contains("auto, i16, i22, f32"), "{err}");
        assert_eq!(Activations::default().format(), Some(Format::native()));
        assert_eq!(Activations::F32.format(), None);
    }
}
