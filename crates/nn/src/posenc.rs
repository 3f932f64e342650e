//! Positional encodings as interchangeable parts: added to the input (sinusoidal, learned),
//! rotating queries and keys (RoPE, with linear, NTK-aware, YaRN and Llama-3 frequency scaling),
//! or biasing attention scores (ALiBi, T5 relative buckets), or none at all.

use augur_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::module::{join, parameter, Module};
use crate::rng::Rng;

/// Which positional encoding a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PosKind {
    /// No positional information (causal attention alone).
    None,
    /// Fixed sinusoids added to the embeddings (Vaswani et al.).
    Sinusoidal,
    /// A learnt table of absolute positions.
    Learned,
    #[default]
    /// Rotary embeddings of queries and keys.
    Rope,
    /// Linear attention biases by distance (Press et al.).
    Alibi,
    /// Learnt, bucketed relative-position biases (T5).
    T5,
}

impl std::str::FromStr for PosKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
            .map_err(|_| format!("unknown positional encoding `{s}` (none, sinusoidal, learned, rope, alibi, t5)"))
    }
}

/// RoPE frequency scaling for contexts longer than the training length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    /// Plain RoPE.
    None,
    /// Position interpolation: positions divided by `factor`.
    Linear {
        /// Context extension factor.
        factor: f64,
    },
    /// NTK-aware: the base grows to `theta × factor^(d / (d − 2))`, stretching low frequencies most.
    Ntk {
        /// Context extension factor.
        factor: f64,
    },
    /// YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between, and
    /// scale attention by `0.1 ln(factor) + 1`.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Training context length.
        original_len: usize,
        /// Rotations per context above which a dimension is kept.
        beta_fast: f64,
        /// Rotations per context below which a dimension is interpolated.
        beta_slow: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (wavelength bands).
    Llama3 {
        /// Overall extension factor.
        factor: f64,
        /// Wavelengths above `original_len / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original_len / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Training context length.
        original_len: usize,
    },
}

impl RopeScaling {
    /// YaRN with the paper's defaults (β_fast 32, β_slow 1).
    pub fn yarn(factor: f64, original_len: usize) -> Self {
        RopeScaling::Yarn { factor, original_len, beta_fast: 32.0, beta_slow: 1.0 }
    }
}

/// Rotary position embedding over `dim` features per head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    /// Rotated width (the head width).
    pub dim: usize,
    /// Base frequency.
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// Rotate pairs `(2i, 2i+1)` (GGUF/Meta order) rather than `(i, i + dim/2)` (HF order).
    pub interleaved: bool,
}

impl Rope {
    /// Unscaled RoPE over `dim` with base `theta`.
    pub fn new(dim: usize, theta: f64) -> Self {
        Rope { dim, theta, scaling: RopeScaling::None, interleaved: false }
    }

    /// The `dim / 2` rotation frequencies after scaling.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.dim as f64;
        let base = |theta: f64| -> Vec<f64> { (0..self.dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d)).collect() };
        match self.scaling {
            RopeScaling::None => base(self.theta),
            RopeScaling::Linear { factor } => base(self.theta).iter().map(|f| f / factor).collect(),
            RopeScaling::Ntk { factor } => base(self.theta * factor.powf(d / (d - 2.0))),
            RopeScaling::Yarn { factor, original_len, beta_fast, beta_slow } => {
                // The dimension whose wavelength completes `rotations` turns over the original context.
                let corr = |rotations: f64| d * (original_len as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta.ln());
                let low = corr(beta_fast).floor().max(0.0);
                let high = corr(beta_slow).ceil().min(d - 1.0);
                base(self.theta)
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low).max(1e-3)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp; // 1: extrapolate (high frequency), 0: interpolate
                        f / factor * (1.0 - keep) + f * keep
                    })
                    .collect()
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_len } => {
                let orig = original_len as f64;
                let (low_wl, high_wl) = (orig / low_freq_factor, orig / high_freq_factor);
                base(self.theta)
                    .iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let s = (orig / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// YaRN's attention temperature (applied to cos and sin), 1 otherwise.
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn { factor, .. } if factor > 1.0 => 0.1 * factor.ln() + 1.0,
            _ => 1.0,
        }
    }

    /// `cos, sin: [len, dim/2]` for positions `start..start+len` (the last tables made on this
    /// thread are kept: every layer of a forward pass asks for the same ones).
    pub fn tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        self.tables_on(start, len, None)
    }

    /// [`Rope::tables`] in `dev`'s memory (host memory for `None`), kept there the same way.
    pub fn tables_on(&self, start: usize, len: usize, dev: Option<&augur_core::Device>) -> Result<(Tensor, Tensor)> {
        type Key = (Rope, usize, usize, String);
        thread_local! {
            static LAST: std::cell::RefCell<Vec<(Key, (Tensor, Tensor))>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let key = (*self, start, len, dev.map_or_else(String::new, |d| d.name()));
        if let Some(hit) = LAST.with(|l| l.borrow().iter().find(|(k, _)| *k == key).map(|(_, t)| t.clone())) {
            return Ok(hit);
        }
        let (c, s) = self.compute_tables(start, len)?;
        let t = (c.to(dev)?, s.to(dev)?);
        LAST.with(|l| {
            let mut l = l.borrow_mut();
            // The host tables and one set per device.
            l.retain(|(k, _)| k.3 != key.3);
            l.push((key, t.clone()));
        });
        Ok(t)
    }

    fn compute_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let f = self.inv_freq();
        let m = self.attention_factor();
        let half = f.len();
        let (mut c, mut s) = (Vec::with_capacity(len * half), Vec::with_capacity(len * half));
        for p in start..start + len {
            for &fi in &f {
                let a = p as f64 * fi;
                c.push((a.cos() * m) as f32);
                s.push((a.sin() * m) as f32);
            }
        }
        Ok((Tensor::from_vec(c, &[len, half])?, Tensor::from_vec(s, &[len, half])?))
    }

    /// Rotate `x: [.., seq, dim]` whose rows sit at positions `start..start+seq`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq = x.shape()[x.rank().saturating_sub(2)];
        let (c, s) = self.tables_on(start, seq, x.device().as_ref())?;
        Ok(x.rope(&c, &s, self.interleaved)?)
    }
}

/// The sinusoidal table of Vaswani et al. for positions `start..start+len`: `[len, dim]`.
pub fn sinusoidal(start: usize, len: usize, dim: usize) -> Result<Tensor> {
    let mut v = Vec::with_capacity(len * dim);
    for p in start..start + len {
        for i in 0..dim {
            let freq = 1.0 / 10000f64.powf((2 * (i / 2)) as f64 / dim as f64);
            let a = p as f64 * freq;
            v.push(if i % 2 == 0 { a.sin() } else { a.cos() } as f32);
        }
    }
    Ok(Tensor::from_vec(v, &[len, dim])?)
}

/// ALiBi head slopes (Press et al. 2022): the geometric sequence `2^(−8i/n)` for a power-of-two
/// head count, otherwise that of the next lower power of two followed by every other slope of
/// the next higher one.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let pow2 = |n: usize| -> Vec<f64> { (1..=n).map(|i| 2f64.powf(-8.0 * i as f64 / n as f64)).collect() };
    if heads.is_power_of_two() {
        return pow2(heads).into_iter().map(|x| x as f32).collect();
    }
    let lower = 1 << (usize::BITS - 1 - heads.leading_zeros());
    let mut s = pow2(lower);
    s.extend(pow2(2 * lower).into_iter().step_by(2).take(heads - lower));
    s.into_iter().map(|x| x as f32).collect()
}

/// T5's bucket for a relative position `key − query` in a causal decoder: exact buckets for
/// short distances, logarithmic ones up to `max_distance`, the last bucket beyond.
pub fn t5_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let n = (-relative).max(0) as usize; // distance back in time
    let exact = buckets / 2;
    if n < exact {
        return n;
    }
    let log = ((n as f64 / exact as f64).ln() / (max_distance as f64 / exact as f64).ln() * (buckets - exact) as f64) as usize;
    (exact + log).min(buckets - 1)
}

/// A model's positional encoding, with its parameters when it learns any.
#[derive(Debug, Clone)]
pub enum PositionalEncoding {
    /// No positions.
    None,
    /// Sinusoids added to the input.
    Sinusoidal {
        /// Model width.
        dim: usize,
    },
    /// A learned `[max_len, dim]` table added to the token embeddings.
    /// A learnt table added to the input.
    Learned {
        /// `[max_len, dim]`.
        table: Tensor,
    },
    /// Rotary embeddings inside attention.
    Rope(Rope),
    /// ALiBi biases inside attention.
    Alibi {
        /// One slope per head.
        slopes: Vec<f32>,
    },
    /// A learned `[buckets, heads]` table of score biases, shared by every layer.
    /// T5 relative biases inside attention.
    T5 {
        /// `[buckets, heads]` learnt biases.
        table: Tensor,
        /// Distance beyond which buckets saturate.
        max_distance: usize,
    },
}

/// T5's defaults.
pub const T5_BUCKETS: usize = 32;
/// T5's default `max_distance`.
pub const T5_MAX_DISTANCE: usize = 128;

impl PositionalEncoding {
    /// The encoding `kind` for a model of width `dim`, `heads` heads of `head_dim`, positions up
    /// to `max_len` (learned tables), initialised from `rng`.
    pub fn new(kind: PosKind, dim: usize, heads: usize, head_dim: usize, max_len: usize, rope: Rope, rng: &mut Rng) -> Self {
        match kind {
            PosKind::None => PositionalEncoding::None,
            PosKind::Sinusoidal => PositionalEncoding::Sinusoidal { dim },
            PosKind::Learned => PositionalEncoding::Learned { table: parameter(&[max_len, dim], || rng.normal() * 0.02) },
            PosKind::Rope => PositionalEncoding::Rope(Rope { dim: head_dim, ..rope }),
            PosKind::Alibi => PositionalEncoding::Alibi { slopes: alibi_slopes(heads) },
            PosKind::T5 => PositionalEncoding::T5 { table: parameter(&[T5_BUCKETS, heads], || 0.0), max_distance: T5_MAX_DISTANCE },
        }
    }

    /// Which kind this is.
    pub fn kind(&self) -> PosKind {
        match self {
            PositionalEncoding::None => PosKind::None,
            PositionalEncoding::Sinusoidal { .. } => PosKind::Sinusoidal,
            PositionalEncoding::Learned { .. } => PosKind::Learned,
            PositionalEncoding::Rope(_) => PosKind::Rope,
            PositionalEncoding::Alibi { .. } => PosKind::Alibi,
            PositionalEncoding::T5 { .. } => PosKind::T5,
        }
    }

    /// Add absolute positions to token embeddings `x: [batch, seq, dim]` starting at `start`.
    pub fn add_to_input(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq = x.shape()[1];
        match self {
            PositionalEncoding::Sinusoidal { dim } => Ok(x.add(&sinusoidal(start, seq, *dim)?)?),
            PositionalEncoding::Learned { table } => {
                if start + seq > table.shape()[0] {
                    return invalid(format!("position {} is past the learned position table ({} positions); use a shorter input", start + seq - 1, table.shape()[0]));
                }
                Ok(x.add(&table.narrow(0, start, seq)?)?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// Rotate queries or keys `[batch, heads, seq, head_dim]` at positions `start..` (RoPE only).
    pub fn rotate(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        match self {
            PositionalEncoding::Rope(r) => r.apply(x, start),
            _ => Ok(x.clone()),
        }
    }

    /// The score bias `[heads, q_len, k_len]` (T5) for queries at the last `q_len` of `k_len`
    /// positions, and the ALiBi slopes.
    pub fn attention_bias(&self, q_len: usize, k_len: usize) -> Result<(Option<Tensor>, Option<Vec<f32>>)> {
        match self {
            PositionalEncoding::Alibi { slopes } => Ok((None, Some(slopes.clone()))),
            PositionalEncoding::T5 { table, max_distance } => {
                let (buckets, heads) = (table.shape()[0], table.shape()[1]);
                let off = k_len - q_len;
                let ids: Vec<u32> = (0..q_len)
                    .flat_map(|i| (0..k_len).map(move |j| t5_bucket(j as i64 - (i + off) as i64, buckets, *max_distance) as u32))
                    .collect();
                let b = table.gather_rows(&ids)?.transpose(0, 1)?.reshape(&[heads, q_len, k_len])?;
                Ok((Some(b), None))
            }
            _ => Ok((None, None)),
        }
    }
}

impl Module for PositionalEncoding {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        match self {
            PositionalEncoding::Learned { table } => f(&join(prefix, "weight"), table),
            PositionalEncoding::T5 { table, .. } => f(&join(prefix, "relative_bias"), table),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_follow_the_paper() {
        assert_eq!(alibi_slopes(8), [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
        // 6 heads: the 4-head slopes, then slopes 1 and 3 of the 8-head sequence.
        assert_eq!(alibi_slopes(6), [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]);
    }

    #[test]
    fn t5_buckets_are_exact_then_logarithmic() {
        assert_eq!((0..16).map(|d| t5_bucket(-d, 32, 128)).collect::<Vec<_>>(), (0..16).collect::<Vec<_>>());
        assert!(t5_bucket(-40, 32, 128) > 16 && t5_bucket(-40, 32, 128) < 31);
        assert_eq!(t5_bucket(-1000, 32, 128), 31);
        assert_eq!(t5_bucket(5, 32, 128), 0, "future keys (masked anyway) share bucket 0");
    }

    #[test]
    fn rope_scalings_keep_high_frequencies_where_they_should() {
        let r = |s| Rope { dim: 64, theta: 10000.0, scaling: s, interleaved: false };
        let plain = r(RopeScaling::None).inv_freq();
        let lin = r(RopeScaling::Linear { factor: 4.0 }).inv_freq();
        let ntk = r(RopeScaling::Ntk { factor: 4.0 }).inv_freq();
        let yarn = r(RopeScaling::yarn(4.0, 256)).inv_freq();
        assert!(lin.iter().zip(&plain).all(|(a, b)| (a * 4.0 - b).abs() < 1e-12));
        // NTK keeps the highest frequency and stretches the lowest the most.
        assert_eq!(ntk[0], plain[0]);
        assert!(ntk[31] < plain[31] && ntk[31] / plain[31] < ntk[1] / plain[1]);
        // YaRN: untouched at the top, fully interpolated at the bottom.
        assert_eq!(yarn[0], plain[0]);
        assert!((yarn[31] * 4.0 - plain[31]).abs() < 1e-15);
        assert!(r(RopeScaling::yarn(4.0, 256)).attention_factor() > 1.1);
    }

    #[test]
    fn sinusoidal_table_matches_the_formula() {
        let t = sinusoidal(3, 2, 4).unwrap().to_vec_f32().unwrap();
        let want = [3f64.sin(), 3f64.cos(), (3.0f64 / 100.0).sin(), (3.0f64 / 100.0).cos()];
        for (a, b) in t[..4].iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }
}
