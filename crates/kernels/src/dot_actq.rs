//! Integer dot products of Q4_0 / Q4_1 / Q8_0 weight rows with [`ActQ`] activations, using
//! AVX-512 VNNI (`vpdpbusd`: 64 unsigned-by-signed byte products per instruction), one
//! instruction per activation plane. Two weight blocks per iteration. Signed weights (Q8_0, and
//! Q4_0's `q - 8`) enter as their absolute values, with the sign moved onto the activations.
//!
//! [`dot_reference`] is the scalar twin: the same integer arithmetic, so the two agree up to the
//! order of the final f32 additions.

use crate::actq::{ActQ, BLOCK, STEP};
use crate::quant::{f16_at, QuantType};

/// Whether [`dot`] has a fast kernel for this type on this CPU.
pub fn supported(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) && vnni()
}

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            crate::cpu::isa() != crate::cpu::Isa::Scalar
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The signed weights of one block (Q4_0: `q - 8`; Q8_0: `q`) or the unsigned ones (Q4_1: `q`).
fn block_weights(ty: QuantType, blk: &[u8]) -> [i32; 32] {
    let mut w = [0i32; 32];
    match ty {
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let (qs, off) = if ty == QuantType::Q4_0 { (&blk[2..18], 8) } else { (&blk[4..20], 0) };
            for j in 0..16 {
                w[j] = (qs[j] & 0xF) as i32 - off;
                w[j + 16] = (qs[j] >> 4) as i32 - off;
            }
        }
        QuantType::Q8_0 => {
            for j in 0..32 {
                w[j] = blk[2 + j] as i8 as i32;
            }
        }
        _ => unreachable!("dot_actq: unsupported type {}", ty.name()),
    }
    w
}

/// One block's contribution, in scalar code: three exact integer dots combined in f32.
fn block_reference(ty: QuantType, blk: &[u8], a: &ActQ, b: usize) -> f32 {
    let w = block_weights(ty, blk);
    let plane = |p: usize| -> f32 { (0..32).map(|j| w[j] * a.planes[p][b * BLOCK + j] as i32).sum::<i32>() as f32 };
    let t = plane(0) + plane(1) / STEP + plane(2) / (STEP * STEP);
    let m = if ty == QuantType::Q4_1 { f16_at(blk, 2) * a.sum[b] } else { 0.0 };
    f16_at(blk, 0) * a.d[b] * t + m
}

/// Scalar twin of [`dot`].
pub fn dot_reference(ty: QuantType, row: &[u8], a: &ActQ) -> f32 {
    row.chunks_exact(ty.block_bytes()).enumerate().map(|(b, blk)| block_reference(ty, blk, a, b)).sum()
}

/// `row · x` where `a` holds `x` quantized. `ty` must be [`supported`].
pub fn dot(ty: QuantType, row: &[u8], a: &ActQ) -> f32 {
    assert_eq!(Some(row.len()), ty.row_bytes(a.len()), "dot_actq {}: row/vector size mismatch", ty.name());
    #[cfg(target_arch = "x86_64")]
    if vnni() {
        // SAFETY: features detected above; sizes checked.
        unsafe {
            return match ty {
                QuantType::Q4_0 => avx512::dot_q4(row, a, 18, 2, true),
                QuantType::Q4_1 => avx512::dot_q4(row, a, 20, 4, false),
                QuantType::Q8_0 => avx512::dot_q8_0(row, a),
                _ => dot_reference(ty, row, a),
            };
        }
    }
    dot_reference(ty, row, a)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Per-lane scales `[s0 × 8, s1 × 8]` with `s_i = d_w(block i) · d_x(block i)`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    unsafe fn scales(p0: *const u8, p1: *const u8, dx: *const f32) -> __m512 {
        let w = (p0 as *const u16).read_unaligned() as i32 | (((p1 as *const u16).read_unaligned() as i32) << 16);
        let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(w));
        let s = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd(dx as *const f64)));
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s))
    }

    /// `Σ w·hi + Σ w·mid / 254 + Σ w·lo / 254²` per lane, for 64 unsigned weight bytes `w`
    /// against 64 activations at `at`; `neg` flips the sign of activations whose weight is
    /// negative (signed weights are passed as their absolute values).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn planes(w: __m512i, a: &ActQ, at: usize, neg: __mmask64) -> __m512 {
        let z = _mm512_setzero_si512();
        let dot = |p: usize| {
            let x = _mm512_loadu_si512(a.planes[p].as_ptr().add(at) as *const _);
            let x = _mm512_mask_sub_epi8(x, neg, z, x);
            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, w, x))
        };
        let t = _mm512_fmadd_ps(dot(1), _mm512_set1_ps(1.0 / STEP), dot(0));
        _mm512_fmadd_ps(dot(2), _mm512_set1_ps(1.0 / (STEP * STEP)), t)
    }

    /// Q4_0 (`bb` 18, nibbles at 2, `signed`: weights `q - 8`) or Q4_1 (`bb` 20, nibbles at 4,
    /// plus `m·Σx`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c,fma")]
    pub unsafe fn dot_q4(row: &[u8], a: &ActQ, bb: usize, qoff: usize, signed: bool) -> f32 {
        let nb = a.d.len();
        let mask = _mm256_set1_epi8(0x0F);
        // [b0lo, b1lo, b0hi, b1hi] (16-byte quarters) -> [b0lo, b0hi, b1lo, b1hi]
        let perm = _mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0);
        let eight = _mm512_set1_epi8(8);
        let mut acc = _mm512_setzero_ps();
        let mut macc = _mm_setzero_ps();
        let base = row.as_ptr();
        let mut b = 0;
        while b + 2 <= nb {
            let (p0, p1) = (base.add(b * bb), base.add((b + 1) * bb));
            let q = _mm256_loadu2_m128i(p1.add(qoff) as *const __m128i, p0.add(qoff) as *const __m128i);
            let lo = _mm256_and_si256(q, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            let mut w = _mm512_permutexvar_epi64(perm, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
            let mut neg = 0;
            if signed {
                let s = _mm512_sub_epi8(w, eight);
                neg = _mm512_movepi8_mask(s);
                w = _mm512_abs_epi8(s);
            } else {
                let m = (p0.add(2) as *const u16).read_unaligned() as i32 | (((p1.add(2) as *const u16).read_unaligned() as i32) << 16);
                let sums = _mm_castpd_ps(_mm_load_sd(a.sum.as_ptr().add(b) as *const f64));
                macc = _mm_fmadd_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(m)), sums, macc);
            }
            acc = _mm512_fmadd_ps(planes(w, a, b * BLOCK, neg), scales(p0, p1, a.d.as_ptr().add(b)), acc);
            b += 2;
        }
        let mv = _mm_add_ps(macc, _mm_movehdup_ps(macc));
        let mut s = _mm512_reduce_add_ps(acc) + _mm_cvtss_f32(mv);
        let ty = if signed { QuantType::Q4_0 } else { QuantType::Q4_1 };
        while b < nb {
            s += block_reference(ty, &row[b * bb..(b + 1) * bb], a, b);
            b += 1;
        }
        s
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c,fma")]
    pub unsafe fn dot_q8_0(row: &[u8], a: &ActQ) -> f32 {
        let nb = a.d.len();
        let mut acc = _mm512_setzero_ps();
        let base = row.as_ptr();
        let mut b = 0;
        while b + 2 <= nb {
            let (p0, p1) = (base.add(b * 34), base.add((b + 1) * 34));
            let q0 = _mm256_loadu_si256(p0.add(2) as *const __m256i);
            let q1 = _mm256_loadu_si256(p1.add(2) as *const __m256i);
            let q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
            let neg = _mm512_movepi8_mask(q);
            // |-128| = 128 is still right as an unsigned byte.
            let w = _mm512_abs_epi8(q);
            acc = _mm512_fmadd_ps(planes(w, a, b * BLOCK, neg), scales(p0, p1, a.d.as_ptr().add(b)), acc);
            b += 2;
        }
        let mut s = _mm512_reduce_add_ps(acc);
        while b < nb {
            s += block_reference(QuantType::Q8_0, &row[b * 34..(b + 1) * 34], a, b);
            b += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    fn data(seed: u64, n: usize, outlier: bool) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if outlier && i % 97 == 5 { v * 60.0 } else { v }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn fast_equals_reference_and_tracks_f32(seed in 1u64..u64::MAX, blocks in 1usize..9, outlier: bool) {
            for ty in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0] {
                let k = blocks * 32;
                let w = data(seed, k, false);
                let x = data(seed ^ 0x5555, k, outlier);
                let row = ty.quantize_row(&w);
                let mut a = ActQ::default();
                a.quantize(&x);
                let r = dot_reference(ty, &row, &a);
                let scale = 1.0 + x.iter().map(|v| v.abs()).sum::<f32>();
                if supported(ty) {
                    let f = dot(ty, &row, &a);
                    prop_assert!((f - r).abs() <= 1e-5 * scale, "{}: fast {} ref {}", ty.name(), f, r);
                }
                // Against the f32 dot: within the activation quantization error (|w| <= ~1.1).
                let exact = reference::dot_quant(ty, &row, &x);
                let bound: f32 = a.d.iter().map(|d| d / (STEP * STEP) * 32.0 * 1.2).sum::<f32>() + 2e-5 * scale;
                prop_assert!((r - exact).abs() <= bound, "{}: actq {} f32 {} bound {}", ty.name(), r, exact, bound);
            }
        }
    }
}
