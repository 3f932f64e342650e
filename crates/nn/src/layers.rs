//! The standard layers. Each owns its parameters and its `forward` is the matching function of
//! [`crate::functional`] applied to them.

use std::sync::Mutex;

use augur_core::Tensor;

use crate::error::Result;
use crate::functional::{self as F, AttentionWeights, KvCache};
use crate::module::{join, parameter, Module};
use crate::posenc::PositionalEncoding;
use crate::rng::Rng;

/// `y = x · wᵀ + b`. The weight may be a frozen quantized GGUF tensor (inference only).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A trainable layer initialised from N(0, std²), zero bias.
    pub fn new(inp: usize, out: usize, bias: bool, std: f64, rng: &mut Rng) -> Self {
        Linear { weight: parameter(&[out, inp], || rng.normal() * std), bias: bias.then(|| parameter(&[out], || 0.0)) }
    }

    /// Existing weights (e.g. a quantized tensor from a GGUF file, frozen).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// Apply the layer to `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        F::linear(x, &self.weight, self.bias.as_ref())
    }

    fn parts(&self) -> (&Tensor, Option<&Tensor>) {
        (&self.weight, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = &mut self.bias {
            f(&join(prefix, "bias"), b);
        }
    }
}

/// A `[rows, dim]` lookup table.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[rows, dim]`.
    pub weight: Tensor,
}

impl Embedding {
    /// A trainable table initialised from N(0, std²).
    pub fn new(rows: usize, dim: usize, std: f64, rng: &mut Rng) -> Self {
        Embedding { weight: parameter(&[rows, dim], || rng.normal() * std) }
    }

    /// Ids laid out as `shape` → `[..shape, dim]`.
    pub fn forward(&self, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
        F::embedding(&self.weight, ids, shape)
    }
}

impl Module for Embedding {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&join(prefix, "weight"), &mut self.weight);
    }
}

#[derive(Debug, Clone)]
/// Layer normalisation over the last dimension, with a learnt scale and bias.
pub struct LayerNorm {
    /// Scale, `[dim]`.
    pub weight: Tensor,
    /// Bias, `[dim]`.
    pub bias: Tensor,
    /// Epsilon added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Scale 1, bias 0.
    pub fn new(dim: usize, eps: f64) -> Self {
        LayerNorm { weight: parameter(&[dim], || 1.0), bias: parameter(&[dim], || 0.0), eps }
    }

    /// Normalise `[.., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        F::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

impl Module for LayerNorm {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&join(prefix, "weight"), &mut self.weight);
        f(&join(prefix, "bias"), &mut self.bias);
    }
}

#[derive(Debug, Clone)]
/// RMS normalisation over the last dimension, with a learnt scale.
pub struct RmsNorm {
    /// Scale, `[dim]`.
    pub weight: Tensor,
    /// Epsilon added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Scale 1.
    pub fn new(dim: usize, eps: f64) -> Self {
        RmsNorm { weight: parameter(&[dim], || 1.0), eps }
    }

    /// Normalise `[.., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        F::rms_norm(x, &self.weight, self.eps)
    }
}

impl Module for RmsNorm {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&join(prefix, "weight"), &mut self.weight);
    }
}

/// Inverted dropout, active in training mode only.
#[derive(Debug)]
pub struct Dropout {
    /// Probability of zeroing an element in training.
    pub p: f64,
    training: bool,
    rng: Mutex<Rng>,
}

impl Dropout {
    /// Dropout with probability `p`, its mask stream seeded by `seed`.
    pub fn new(p: f64, seed: u64) -> Self {
        Dropout { p, training: true, rng: Mutex::new(Rng::new(seed)) }
    }

    /// Zero and rescale elements in training; the identity in evaluation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        F::dropout(x, self.p, self.training, &mut rng)
    }
}

impl Module for Dropout {
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(&str, &mut Tensor)) {}
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

/// Llama's gated MLP.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// Gate projection `[hidden, dim]`.
    pub gate: Linear,
    /// Up projection `[hidden, dim]`.
    pub up: Linear,
    /// Down projection `[dim, hidden]`.
    pub down: Linear,
}

impl SwiGlu {
    /// Weights from N(0, std²), the down projection from N(0, out_std²).
    pub fn new(dim: usize, hidden: usize, std: f64, out_std: f64, rng: &mut Rng) -> Self {
        SwiGlu { gate: Linear::new(dim, hidden, false, std, rng), up: Linear::new(dim, hidden, false, std, rng), down: Linear::new(hidden, dim, false, out_std, rng) }
    }

    /// `down(silu(gate(x)) · up(x))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        F::swiglu(x, &self.gate.weight, &self.up.weight, &self.down.weight)
    }
}

impl Module for SwiGlu {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.gate.visit(&join(prefix, "gate"), f);
        self.up.visit(&join(prefix, "up"), f);
        self.down.visit(&join(prefix, "down"), f);
    }
}

/// GPT-2's MLP.
#[derive(Debug, Clone)]
pub struct GeluMlp {
    /// `[hidden, dim]`.
    pub fc: Linear,
    /// `[dim, hidden]`.
    pub proj: Linear,
}

impl GeluMlp {
    /// Weights from N(0, std²), the output projection from N(0, out_std²).
    pub fn new(dim: usize, hidden: usize, bias: bool, std: f64, out_std: f64, rng: &mut Rng) -> Self {
        GeluMlp { fc: Linear::new(dim, hidden, bias, std, rng), proj: Linear::new(hidden, dim, bias, out_std, rng) }
    }

    /// `proj(gelu(fc(x)))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        F::gelu_mlp(x, self.fc.parts(), self.proj.parts())
    }
}

impl Module for GeluMlp {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.fc.visit(&join(prefix, "fc"), f);
        self.proj.visit(&join(prefix, "proj"), f);
    }
}

/// Causal multi-head attention with grouped KV heads; positions come from a [`PositionalEncoding`].
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    /// Query projection.
    pub wq: Linear,
    /// Key projection.
    pub wk: Linear,
    /// Value projection.
    pub wv: Linear,
    /// Output projection.
    pub wo: Linear,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
}

impl MultiHeadAttention {
    /// Random projections; the output projection from N(0, out_std²).
    pub fn new(dim: usize, heads: usize, kv_heads: usize, bias: bool, std: f64, out_std: f64, rng: &mut Rng) -> Self {
        let hd = dim / heads;
        MultiHeadAttention {
            wq: Linear::new(dim, heads * hd, bias, std, rng),
            wk: Linear::new(dim, kv_heads * hd, bias, std, rng),
            wv: Linear::new(dim, kv_heads * hd, bias, std, rng),
            wo: Linear::new(heads * hd, dim, bias, out_std, rng),
            heads,
            kv_heads,
        }
    }

    /// `x: [batch, seq, dim]`; with a cache, the positions continue after the cached ones.
    pub fn forward(&self, x: &Tensor, pos: &PositionalEncoding, score_bias: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let w = AttentionWeights { wq: self.wq.parts(), wk: self.wk.parts(), wv: self.wv.parts(), wo: self.wo.parts() };
        F::self_attention(x, w, (self.heads, self.kv_heads), pos, score_bias, cache)
    }
}

impl Module for MultiHeadAttention {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.wq.visit(&join(prefix, "wq"), f);
        self.wk.visit(&join(prefix, "wk"), f);
        self.wv.visit(&join(prefix, "wv"), f);
        self.wo.visit(&join(prefix, "wo"), f);
    }
}
