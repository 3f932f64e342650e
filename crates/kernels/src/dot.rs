//! Dot products of one weight row with f32 activations, dequantizing in registers.
//!
//! `dot_quant` is the decode hot path (one activation vector). Q4_0 / Q4_1 / Q8_0 have fused AVX2
//! kernels; the K-quants dequantize one 256-weight block into a stack buffer and dot that, which
//! keeps them exact and reasonably fast. Activations stay f32: this is augur's exact path
//! (llama.cpp instead quantizes activations to 8 bits, which costs fidelity).

use crate::cpu::{isa, Isa};
use crate::quant::QuantType;
use crate::reference;

/// `Σ x[i] * y[i]` (SIMD where available).
pub fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "dot_f32: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: AVX2 and FMA were detected at run time; lengths are equal.
        return unsafe { avx2::dot_f32(x, y) };
    }
    reference::dot_f32(x, y)
}

/// Dot product of the quantized row `row` (type `ty`, `x.len()` weights) with `x`.
pub fn dot_quant(ty: QuantType, row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(Some(row.len()), ty.row_bytes(x.len()), "dot_quant {}: row/vector size mismatch", ty.name());
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: AVX2+FMA detected; sizes checked above.
        unsafe {
            return match ty {
                QuantType::Q4_0 => avx2::dot_q4_0(row, x),
                QuantType::Q4_1 => avx2::dot_q4_1(row, x),
                QuantType::Q8_0 => avx2::dot_q8_0(row, x),
                _ => dot_by_block(ty, row, x),
            };
        }
    }
    dot_by_block(ty, row, x)
}

/// Generic path: dequantize a block at a time into a stack buffer, then an f32 dot.
fn dot_by_block(ty: QuantType, row: &[u8], x: &[f32]) -> f32 {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    let mut buf = [0f32; crate::quant::QK_K];
    let mut acc = 0f32;
    for (b, xb) in row.chunks_exact(bb).zip(x.chunks_exact(bl)) {
        ty.dequantize_block(b, &mut buf[..bl]);
        acc += dot_f32(&buf[..bl], xb);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::quant::f16_at;
    use crate::vec::hsum_m256 as hsum;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in a.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i + 8 * j)), _mm256_loadu_ps(py.add(i + 8 * j)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)), a[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        while i < n {
            s += x[i] * y[i];
            i += 1;
        }
        s
    }

    /// 16 packed bytes of nibbles -> (weights 0..16 as u8, weights 16..32 as u8).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8) -> (__m128i, __m128i) {
        let qs = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        (_mm_and_si128(qs, m), _mm_and_si128(_mm_srli_epi16(qs, 4), m))
    }

    /// Σ q[j] * x[j] for 16 u8 (or i8 when `signed`) values against x[0..16], as a vector of 8 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot16(q: __m128i, x: *const f32, signed: bool, acc: __m256) -> __m256 {
        let (a, b) = if signed {
            (_mm256_cvtepi8_epi32(q), _mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))
        } else {
            (_mm256_cvtepu8_epi32(q), _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)))
        };
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(x), acc);
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), _mm256_loadu_ps(x.add(8)), acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_0(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let eight = _mm_set1_epi8(8);
        for (b, xb) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let (lo, hi) = nibbles(b.as_ptr().add(2));
            let (lo, hi) = (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
            let s = dot16(lo, xb.as_ptr(), true, _mm256_setzero_ps());
            let s = dot16(hi, xb.as_ptr().add(16), true, s);
            acc = _mm256_fmadd_ps(d, s, acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for (b, xb) in row.chunks_exact(20).zip(x.chunks_exact(32)) {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let m = _mm256_set1_ps(f16_at(b, 2));
            let (lo, hi) = nibbles(b.as_ptr().add(4));
            let s = dot16(lo, xb.as_ptr(), false, _mm256_setzero_ps());
            let s = dot16(hi, xb.as_ptr().add(16), false, s);
            acc = _mm256_fmadd_ps(d, s, acc);
            let p = xb.as_ptr();
            let xs = _mm256_add_ps(
                _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))),
                _mm256_add_ps(_mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))),
            );
            accm = _mm256_fmadd_ps(m, xs, accm);
        }
        hsum(_mm256_add_ps(acc, accm))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let q0 = _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(b.as_ptr().add(18) as *const __m128i);
            let s = dot16(q0, xb.as_ptr(), true, _mm256_setzero_ps());
            let s = dot16(q1, xb.as_ptr().add(16), true, s);
            acc = _mm256_fmadd_ps(d, s, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::testdata::xorshift as vec_from;

    proptest! {
        #[test]
        fn dot_quant_matches_reference(seed in 1u64..u64::MAX, blocks in 1usize..5, off in 0usize..3) {
            for ty in QuantType::ALL {
                let k = blocks * ty.block_len();
                let w = vec_from(seed, k);
                // an offset into a larger buffer exercises unaligned loads
                let x_all = vec_from(seed.rotate_left(7), k + off);
                let x = &x_all[off..];
                let row = ty.quantize_row(&w);
                let fast = dot_quant(ty, &row, x);
                let slow = reference::dot_quant(ty, &row, x);
                let tol = 1e-5 * (1.0 + x.iter().map(|v| v.abs()).sum::<f32>());
                prop_assert!((fast - slow).abs() <= tol, "{}: fast {} ref {} (k={})", ty.name(), fast, slow, k);
            }
        }

        #[test]
        fn dot_f32_matches_reference(seed in 1u64..u64::MAX, n in 0usize..200) {
            let x = vec_from(seed, n);
            let y = vec_from(seed ^ 0xABCD, n);
            let (a, b) = (dot_f32(&x, &y), reference::dot_f32(&x, &y));
            prop_assert!((a - b).abs() <= 1e-4 * (1.0 + n as f32), "{} vs {}", a, b);
        }
    }
}
