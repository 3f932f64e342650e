//! [`Format::Planes`] dots on AVX2 without VNNI: `vpmaddubsw` + `vpmaddwd` per plane, one block at a time.

use super::kind::{block_bytes, Q4_0, Q4_1, Q8_0};
use crate::vec::hsum_m256 as hsum;
use super::*;
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dispatch<const KIND: u8>(row: &[u8], acts: &[&ActQ], out: &mut [f32]) {
    match acts.len() {
        1 => rows::<KIND, 1>(row, acts.try_into().unwrap(), out),
        2 => rows::<KIND, 2>(row, acts.try_into().unwrap(), out),
        3 => rows::<KIND, 3>(row, acts.try_into().unwrap(), out),
        _ => rows::<KIND, 4>(row, acts.try_into().unwrap(), out),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32)))
}


/// One block's 32 weights as unsigned bytes in activation order, and (signed kinds) the
/// signed weights, whose signs `vpsignb` moves onto the activations.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn weights<const KIND: u8>(p: *const u8) -> (__m256i, __m256i) {
    if KIND == Q8_0 {
        let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
        return (_mm256_abs_epi8(q), q);
    }
    let off = if KIND == Q4_0 { 2 } else { 4 };
    let q = _mm_loadu_si128(p.add(off) as *const __m128i);
    let mask = _mm256_set1_epi8(0x0F);
    let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
    if KIND == Q4_0 {
        let s = _mm256_sub_epi8(w, _mm256_set1_epi8(8));
        (_mm256_abs_epi8(s), s)
    } else {
        (w, w)
    }
}

/// Dots of one row with `N` activation vectors, a block at a time. (Two accumulators per
/// vector, even and odd blocks, measured no faster: 9.0 vs 10.3 G weights/s.)
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const KIND: u8, const N: usize>(row: &[u8], acts: [&ActQ; N], out: &mut [f32]) {
    let bb = block_bytes(KIND);
    let nb = acts[0].d.len();
    let ones = _mm256_set1_epi16(1);
    let (s1, s2) = (_mm256_set1_ps(1.0 / STEP), _mm256_set1_ps(1.0 / (STEP * STEP)));
    let mut acc = [_mm256_setzero_ps(); N];
    let mut macc = [0f32; N];
    for b in 0..nb {
        let p = row.as_ptr().add(b * bb);
        let (w, sign) = weights::<KIND>(p);
        let d = f16(p);
        let m = if KIND == Q4_1 { f16(p.add(2)) } else { 0.0 };
        for t in 0..N {
            let a = acts[t];
            let dot = |plane: usize| {
                let mut x = _mm256_loadu_si256(a.planes[plane].as_ptr().add(b * BLOCK) as *const __m256i);
                if KIND != Q4_1 {
                    x = _mm256_sign_epi8(x, sign);
                }
                _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
            };
            let v = _mm256_fmadd_ps(dot(2), s2, _mm256_fmadd_ps(dot(1), s1, dot(0)));
            acc[t] = _mm256_fmadd_ps(v, _mm256_set1_ps(d * a.d[b]), acc[t]);
            if KIND == Q4_1 {
                macc[t] += m * a.sum[b];
            }
        }
    }
    for t in 0..N {
        out[t] = hsum(acc[t]) + macc[t];
    }
}
