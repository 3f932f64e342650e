//! [`Format::Planes`] dots on AVX-512 VNNI: one `vpdpbusd` per plane and 64 weights, two blocks per step.

use super::kind::{block_bytes, quant_type, Q4_0, Q4_1, Q8_0};
use super::*;
use std::arch::x86_64::*;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c,fma")]
pub unsafe fn dispatch<const KIND: u8>(row: &[u8], acts: &[&ActQ], out: &mut [f32], n: usize) {
    match n {
        1 => rows::<KIND, 1>(row, acts.try_into().unwrap(), out),
        2 => rows::<KIND, 2>(row, acts.try_into().unwrap(), out),
        3 => rows::<KIND, 3>(row, acts.try_into().unwrap(), out),
        _ => rows::<KIND, 4>(row, acts.try_into().unwrap(), out),
    }
}

/// `Σ w·hi + Σ w·mid / 254 + Σ w·lo / 254²` per lane, for 64 unsigned weight bytes `w`
/// against 64 activations at `at`; with `SIGNED`, activations whose weight is negative are
/// negated (signed weights arrive as absolute values).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn planes<const SIGNED: bool>(w: __m512i, a: &ActQ, at: usize, neg: __mmask64) -> __m512 {
    let z = _mm512_setzero_si512();
    let dot = |p: usize| {
        let mut x = _mm512_loadu_si512(a.planes[p].as_ptr().add(at) as *const _);
        if SIGNED {
            x = _mm512_mask_sub_epi8(x, neg, z, x);
        }
        _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, w, x))
    };
    let t = _mm512_fmadd_ps(dot(1), _mm512_set1_ps(1.0 / STEP), dot(0));
    _mm512_fmadd_ps(dot(2), _mm512_set1_ps(1.0 / (STEP * STEP)), t)
}

/// The 64 weights of blocks `b` and `b + 1` as unsigned bytes in activation order, and the
/// mask of negative weights (signed kinds).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl")]
unsafe fn weights<const KIND: u8>(p0: *const u8, p1: *const u8) -> (__m512i, __mmask64) {
    if KIND == Q8_0 {
        let q0 = _mm256_loadu_si256(p0.add(2) as *const __m256i);
        let q1 = _mm256_loadu_si256(p1.add(2) as *const __m256i);
        let q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
        // |-128| = 128 is still right as an unsigned byte.
        return (_mm512_abs_epi8(q), _mm512_movepi8_mask(q));
    }
    let off = if KIND == Q4_0 { 2 } else { 4 };
    let q = _mm256_loadu2_m128i(p1.add(off) as *const __m128i, p0.add(off) as *const __m128i);
    let mask = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(q, mask);
    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
    // [b0lo, b1lo, b0hi, b1hi] (16-byte quarters) -> [b0lo, b0hi, b1lo, b1hi]
    let perm = _mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0);
    let w = _mm512_permutexvar_epi64(perm, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    if KIND == Q4_0 {
        let s = _mm512_sub_epi8(w, _mm512_set1_epi8(8));
        (_mm512_abs_epi8(s), _mm512_movepi8_mask(s))
    } else {
        (w, 0)
    }
}

/// Dots of one row with `N` activation vectors. Block scales are fetched 16 blocks at a time
/// with one gather of each block's first 4 bytes (`d`, and `m` for Q4_1), converted and
/// multiplied by the activation scales in one go; each block pair then only permutes its two
/// scales into lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c,fma")]
unsafe fn rows<const KIND: u8, const N: usize>(row: &[u8], acts: [&ActQ; N], out: &mut [f32]) {
    let bb = block_bytes(KIND);
    let nb = acts[0].d.len();
    let signed = KIND != Q4_1;
    let offs = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(bb as i32),
    );
    let pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut macc = [_mm512_setzero_ps(); N];
    let base = row.as_ptr();
    let mut g = 0;
    while nb - g >= 2 {
        let nblk = (nb - g).min(16) & !1;
        let kmask: __mmask16 = if nblk == 16 { 0xFFFF } else { ((1u32 << nblk) - 1) as u16 };
        let hdr = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), kmask, offs, base.add(g * bb) as *const i32);
        let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hdr));
        let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hdr, 16)));
        let mut s = [_mm512_setzero_ps(); N];
        for t in 0..N {
            s[t] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(kmask, acts[t].d.as_ptr().add(g)));
            if KIND == Q4_1 {
                macc[t] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(kmask, acts[t].sum.as_ptr().add(g)), macc[t]);
            }
        }
        let mut idx = pair_idx;
        for p in 0..nblk / 2 {
            let b = g + 2 * p;
            let (w, neg) = weights::<KIND>(base.add(b * bb), base.add((b + 1) * bb));
            for t in 0..N {
                let v = if signed { planes::<true>(w, acts[t], b * BLOCK, neg) } else { planes::<false>(w, acts[t], b * BLOCK, 0) };
                acc[t] = _mm512_fmadd_ps(v, _mm512_permutexvar_ps(idx, s[t]), acc[t]);
            }
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(2));
        }
        g += nblk;
    }
    for t in 0..N {
        let mut v = _mm512_reduce_add_ps(acc[t]) + _mm512_reduce_add_ps(macc[t]);
        if g < nb {
            v += block_reference(quant_type(KIND), &row[g * bb..(g + 1) * bb], acts[t], g);
        }
        out[t] = v;
    }
}
