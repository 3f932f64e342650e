//! Per-row ops of a Llama layer, in place or into caller-owned buffers (no allocation).

use crate::dot::dot_f32;
use crate::real::{hmax16, hsum16};

/// `out = x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == w.len() && x.len() == out.len(), "rms_norm: length mismatch");
    let ms = dot_f32(x, x) / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * s * g;
    }
}

/// Softmax in place (max-subtracted). `-inf` entries get probability exactly 0.
///
/// Written in 16-lane chunks with [`exp`] so that, inlined into a `target_feature` function (as
/// the attention kernel does), it vectorizes; relative error ~2e-7 against `f32::exp`.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = chunks.into_remainder().iter().copied().fold(hmax16(mx), f32::max);
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = exp(c[i] - m);
            acc[i] += c[i];
        }
    }
    let mut s = hsum16(acc);
    for v in chunks.into_remainder() {
        *v = exp(*v - m);
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Sum of the eight lanes of an AVX vector: the halves added, then pairs, then the last two.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn hsum_m256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// Below this, [`exp`] and its vector twins give exactly 0 (masked scores are -inf).
pub(crate) const EXP_MIN: f32 = -87.3;
/// `ln 2` split in two for the Cody-Waite reduction: `LN2_HI` has trailing zero bits, so
/// `n · LN2_HI` is exact for the `n` that occur.
pub(crate) const LN2_HI: f32 = 0.693_145_75;
pub(crate) const LN2_LO: f32 = 1.428_606_8e-6;
/// The degree-6 Taylor coefficients of `e^r`, highest degree first (for Horner's scheme).
pub(crate) const EXP_TAYLOR: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `e^x` as a straight-line sequence the compiler can vectorise (no libm call, no saturating
/// float-to-int cast): Cody-Waite range reduction `x = n·ln2 + r`, `|r| <= ln2/2`, a degree-6
/// Taylor polynomial (truncation < 1.2e-7 relative), and `2^n` built in the exponent bits.
/// `-inf` (and anything below -87.3) gives 0; results above f32's range give +inf.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    // 88.72283 is the largest f32 whose exponential is finite in f32.
    const HI: f32 = 88.722_83;
    let xc = x.clamp(EXP_MIN, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is an integer in [-126, 128]: read it from the rounding constant's mantissa bits. 2^n in
    // two factors, so n = 128 (x above 88.38) does not overflow the exponent field.
    let ni = ((xc * LOG2E + ROUND).to_bits() as i32) - 0x4B40_0000;
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    let y = p * f32::from_bits(((n1 + 127) << 23) as u32) * f32::from_bits(((n2 + 127) << 23) as u32);
    let y = if x < EXP_MIN { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

crate::multiversion! {
    /// `g = silu(g) * u`, with [`exp`] (vectorized at the CPU's width; within ~2e-7 of libm).
    pub fn silu_mul(g: &mut [f32], u: &[f32]) {
        assert_eq!(g.len(), u.len(), "silu_mul: length mismatch");
        for (a, b) in g.iter_mut().zip(u) {
            *a = *a / (1.0 + exp(-*a)) * b;
        }
    }
}

crate::multiversion! {
    /// `x += y`.
    pub fn add_assign(x: &mut [f32], y: &[f32]) {
        assert_eq!(x.len(), y.len(), "add_assign: length mismatch");
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }
}

/// The cos/sin table of one position: `cs[i] = (cos(pos·f_i), sin(pos·f_i))`. The angle is formed
/// in f32 as HF transformers does, then its cos/sin taken in f64 and rounded.
pub fn rope_angles(pos: usize, inv_freq: &[f32], cs: &mut [(f32, f32)]) {
    for (c, &f) in cs.iter_mut().zip(inv_freq) {
        let a = (pos as f32 * f) as f64;
        *c = (a.cos() as f32, a.sin() as f32);
    }
}

/// Rotate each `head_dim` slice of `x` by `cs`. `interleaved`: pairs `(2i, 2i+1)` (GGUF weight
/// order, llama.cpp's "norm" RoPE); otherwise `(i, i + head_dim/2)` (HF "rotate half").
pub fn rope(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)], interleaved: bool) {
    let half = head_dim / 2;
    for h in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cs.iter().enumerate().take(half) {
            let (i0, i1) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (a, b) = (h[i0], h[i1]);
            h[i0] = a * c - b * s;
            h[i1] = b * c + a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    #[test]
    fn exp_limits() {
        // Up to the largest f32 with a finite exponential (88.72245 was a flaky proptest case).
        for x in [88.7f32, 88.72245, 88.72283] {
            let (a, b) = (exp(x), x.exp());
            assert!(a.is_finite() && (a - b).abs() <= 3e-7 * b, "exp({x}) = {a} vs {b}");
        }
        assert_eq!(exp(88.72284), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    proptest! {
        #[test]
        fn rms_norm_matches_reference(x in proptest::collection::vec(-10f32..10.0, 1..300)) {
            let w: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let mut out = vec![0f32; x.len()];
            rms_norm(&x, &w, 1e-5, &mut out);
            let want = reference::rms_norm(&x, &w, 1e-5);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
            }
        }

        #[test]
        fn exp_matches_libm(x in -100f32..100.0) {
            let (a, b) = (exp(x), x.exp());
            prop_assert!(a == b || (a - b).abs() <= 3e-7 * b.abs() + 1e-37, "exp({}) = {} vs {}", x, a, b);
        }

        #[test]
        fn softmax_matches_reference(x in proptest::collection::vec(-50f32..50.0, 1..100)) {
            let mut y = x.clone();
            y.push(f32::NEG_INFINITY);
            softmax(&mut y);
            prop_assert_eq!(y.pop(), Some(0.0));
            for (a, b) in y.iter().zip(&reference::softmax(&x)) {
                prop_assert!((a - b).abs() <= 1e-6);
            }
        }

        #[test]
        fn rope_matches_reference(x in proptest::collection::vec(-2f32..2.0, 64), pos in 0usize..5000, inter: bool) {
            let inv: Vec<f32> = (0..32).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 64.0)).collect();
            let mut cs = vec![(0f32, 0f32); 32];
            rope_angles(pos, &inv, &mut cs);
            let mut y = x.clone();
            rope(&mut y, 64, &cs, inter);
            for (a, b) in y.iter().zip(&reference::rope(&x, pos, &inv, inter)) {
                prop_assert!((a - b).abs() <= 1e-5);
            }
        }

        #[test]
        fn silu_mul_matches_reference(g in proptest::collection::vec(-20f32..20.0, 1..64)) {
            let u: Vec<f32> = g.iter().map(|v| v * 0.3 - 1.0).collect();
            let mut y = g.clone();
            silu_mul(&mut y, &u);
            for (a, b) in y.iter().zip(&reference::silu_mul(&g, &u)) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
        }
    }
}
