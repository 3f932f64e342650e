//! The mutable run state of one sequence: KV cache and scratch buffers.
//!
//! Buffers only grow; after the first step at a given batch size, a forward pass allocates nothing.

use augur_kernels::actq::{ActQ, Format};
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

/// Keys and values of one layer for every position so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct LayerCache {
    /// [seq, n_kv_head, head_dim]
    pub k: Vec<f32>,
    /// [seq, n_kv_head, head_dim]
    pub v: Vec<f32>,
}

impl LayerCache {
    /// Write new positions' keys/values at `pos0..` (dropping anything cached past `pos0`).
    pub fn append(&mut self, pos0: usize, kv_dim: usize, k: &[f32], v: &[f32]) {
        self.k.truncate(pos0 * kv_dim);
        self.v.truncate(pos0 * kv_dim);
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
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
            kv: vec![LayerCache::default(); cfg.n_layer],
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

    /// Keys and values cached for layer `layer`, `[len, n_kv_head * head_dim]` each (host
    /// caches only: empty for a model on a device).
    pub fn kv(&self, layer: usize) -> (&[f32], &[f32]) {
        let l = &self.kv[layer];
        let n = (self.pos * self.kv_dim).min(l.k.len());
        (&l.k[..n], &l.v[..n])
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
        let per = self.kv_dim;
        for l in &mut self.kv {
            if l.k.len() < (base + keep.iter().max().map_or(0, |m| m + 1)) * per {
                continue; // a layer this pass did not reach (early exit) holds nothing to keep
            }
            for (dst, &src) in keep.iter().enumerate() {
                let (d, s) = ((base + dst) * per, (base + src) * per);
                if d != s {
                    l.k.copy_within(s..s + per, d);
                    l.v.copy_within(s..s + per, d);
                }
            }
        }
        self.pos = base + keep.len();
    }

    /// Reserve room for `positions` in the KV cache up front (avoids growth during decode).
    pub fn reserve(&mut self, cfg: &Config, positions: usize) {
        let per = cfg.n_kv_head * cfg.head_dim;
        for l in &mut self.kv {
            let want = positions * per;
            l.k.reserve(want.saturating_sub(l.k.len()));
            l.v.reserve(want.saturating_sub(l.v.len()));
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
