//! Stateless versions of every module's computation: weights come in as arguments. Each module's
//! `forward` is its function here applied to its own parameters.

use std::sync::Arc;

use augur_core::{AttentionMask, Tensor};

use crate::error::{invalid, Result};
use crate::posenc::PositionalEncoding;
use crate::rng::Rng;

/// `x · wᵀ + b` for `w: [out, in]` (any dtype; quantized weights are frozen).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.linear(w)?;
    Ok(match b {
        Some(b) => y.add(b)?,
        None => y,
    })
}

/// Rows of `table` for token ids laid out as `shape` (e.g. `[batch, seq]`): `[..shape, dim]`.
pub fn embedding(table: &Tensor, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    if shape.iter().product::<usize>() != ids.len() {
        return invalid(format!("embedding: {} ids do not fill shape {shape:?}", ids.len()));
    }
    let rows = table.shape()[0];
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
        return invalid(format!("embedding: token id {bad} is outside the vocabulary of {rows}"));
    }
    let mut out = shape.to_vec();
    out.push(table.shape()[1]);
    Ok(table.gather_rows(ids)?.reshape(&out)?)
}

/// LayerNorm over the last dimension: `(x - mean) / √(var + eps) · w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.layer_norm(w, b, eps)?)
}

/// RMSNorm over the last dimension: `x / √(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.rms_norm(w, eps)?)
}

/// Inverted dropout: zero each element with probability `p` and scale the rest by `1/(1−p)`;
/// the identity when not training or `p = 0`.
pub fn dropout(x: &Tensor, p: f64, training: bool, rng: &mut Rng) -> Result<Tensor> {
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        return invalid(format!("dropout probability {p} must be in [0, 1)"));
    }
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.numel()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
    Ok(x.mul(&Tensor::from_vec(mask, x.shape())?)?)
}

/// Llama's gated MLP: `down(silu(gate(x)) ⊙ up(x))`.
pub fn swiglu(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let h = x.linear(gate)?.silu()?.mul(&x.linear(up)?)?;
    Ok(h.linear(down)?)
}

/// GPT-2's MLP: `proj(gelu(fc(x)))`.
pub fn gelu_mlp(x: &Tensor, fc: (&Tensor, Option<&Tensor>), proj: (&Tensor, Option<&Tensor>)) -> Result<Tensor> {
    linear(&linear(x, fc.0, fc.1)?.gelu()?, proj.0, proj.1)
}

/// Keys and values of the positions seen so far, `[batch, kv_heads, len, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.shape()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget every cached position.
    pub fn clear(&mut self) {
        *self = KvCache::default();
    }

    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let join = |old: &Option<Tensor>, new: Tensor| -> Result<Tensor> {
            Ok(match old {
                Some(o) => Tensor::cat(&[o, &new], 2)?,
                None => new,
            })
        };
        let (k, v) = (join(&self.k, k)?, join(&self.v, v)?);
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }
}

/// The projection weights of one attention layer (`[out, in]` each, optional biases as Qwen2 has).
#[derive(Debug, Clone, Copy)]
pub struct AttentionWeights<'a> {
    /// Query projection and bias.
    pub wq: (&'a Tensor, Option<&'a Tensor>),
    /// Key projection and bias.
    pub wk: (&'a Tensor, Option<&'a Tensor>),
    /// Value projection and bias.
    pub wv: (&'a Tensor, Option<&'a Tensor>),
    /// Output projection and bias.
    pub wo: (&'a Tensor, Option<&'a Tensor>),
}

/// Causal multi-head self-attention with grouped KV heads over `x: [batch, seq, dim]`.
/// Positions start at the cache's length; `score_bias` (`[heads, seq, cache + seq]`, e.g. T5's)
/// is shared by every layer, so the caller computes it once.
pub fn self_attention(
    x: &Tensor,
    w: AttentionWeights,
    (heads, kv_heads): (usize, usize),
    pos: &PositionalEncoding,
    score_bias: Option<&Tensor>,
    cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    let &[b, t, _] = x.shape() else { return invalid(format!("attention input must be [batch, seq, dim], got {:?}", x.shape())) };
    let split = |y: Tensor, h: usize| -> Result<Tensor> {
        let hd = y.shape()[2] / h;
        Ok(y.reshape(&[b, t, h, hd])?.transpose(1, 2)?)
    };
    let start = cache.as_ref().map_or(0, |c| c.len());
    let q = pos.rotate(&split(linear(x, w.wq.0, w.wq.1)?, heads)?, start)?;
    let k = pos.rotate(&split(linear(x, w.wk.0, w.wk.1)?, kv_heads)?, start)?;
    let v = split(linear(x, w.wv.0, w.wv.1)?, kv_heads)?;
    let (k, v) = match cache {
        Some(c) => c.append(k, v)?,
        None => (k, v),
    };
    let alibi = match pos {
        PositionalEncoding::Alibi { slopes } => Some(slopes.clone()),
        _ => None,
    };
    let mask = AttentionMask { causal: true, allow: None::<Arc<[bool]>>, alibi, scale: None };
    let o = Tensor::attention(&q, &k, &v, score_bias, &mask)?;
    let hd = o.shape()[3];
    linear(&o.transpose(1, 2)?.reshape(&[b, t, heads * hd])?, w.wo.0, w.wo.1)
}
