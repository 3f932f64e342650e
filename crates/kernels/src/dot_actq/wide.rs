//! [`Format::Wide`] dots on AVX2: weights widened to i16 in registers, two `vpmaddwd` per block.

use super::kind::{block_bytes, Q4_0, Q4_1, Q8_0};
use crate::vec::hsum_m256 as hsum;
use super::*;
use std::arch::x86_64::*;

/// `out[r * n + t]` for the rows of `w` (`rb` bytes each) and up to four vectors: rows in
/// pairs for one or two vectors.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dispatch<const KIND: u8>(w: &[u8], rb: usize, acts: &[&ActQ], out: &mut [f32]) {
    let (n, p) = (acts.len(), w.as_ptr());
    let nrows = w.len() / rb;
    let mut r = 0;
    if n <= 2 {
        while r + 2 <= nrows {
            let o = &mut out[r * n..(r + 2) * n];
            match n {
                1 => rows::<KIND, 2, 1>(p.add(r * rb), rb, acts.try_into().unwrap(), o),
                _ => rows::<KIND, 2, 2>(p.add(r * rb), rb, acts.try_into().unwrap(), o),
            }
            r += 2;
        }
    }
    for r in r..nrows {
        let o = &mut out[r * n..(r + 1) * n];
        match n {
            1 => rows::<KIND, 1, 1>(p.add(r * rb), rb, acts.try_into().unwrap(), o),
            2 => rows::<KIND, 1, 2>(p.add(r * rb), rb, acts.try_into().unwrap(), o),
            3 => rows::<KIND, 1, 3>(p.add(r * rb), rb, acts.try_into().unwrap(), o),
            _ => rows::<KIND, 1, 4>(p.add(r * rb), rb, acts.try_into().unwrap(), o),
        }
    }
}

/// How far ahead of the current block the kernel prefetches weights, in bytes (decode on a
/// 2-core Zen 3, alternating runs: 640 bytes +27% over none, 2048 better again, 4096 no
/// better than 2048).
const PREFETCH: usize = 2048;

/// One block's 32 weights as two vectors of 16 i16, in activation order.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn weights<const KIND: u8>(p: *const u8) -> (__m256i, __m256i) {
    if KIND == Q8_0 {
        let half = |o: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(o) as *const __m128i));
        return (half(2), half(18));
    }
    let off = if KIND == Q4_0 { 2 } else { 4 };
    // Bytes 0-7 into the low half's i16 lanes and 8-15 into the high half's, zero-extended,
    // by one in-lane shuffle of the 16 bytes loaded into both halves (`vpmovzxbw` crosses
    // lanes: slower on Zen).
    let spread = _mm256_setr_epi8(
        0, -1, 1, -1, 2, -1, 3, -1, 4, -1, 5, -1, 6, -1, 7, -1, 8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1,
    );
    let q = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(off) as *const __m128i)), spread);
    let (lo, hi) = (_mm256_and_si256(q, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(q, 4));
    if KIND == Q4_0 {
        let eight = _mm256_set1_epi16(8);
        (_mm256_sub_epi16(lo, eight), _mm256_sub_epi16(hi, eight))
    } else {
        (lo, hi)
    }
}

/// The two f16 numbers at the start of eight blocks (lane b: block b's first 4 bytes), as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn halves(hdr: __m256i) -> (__m256, __m256) {
    let pack = |v: __m256i| _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)));
    (pack(_mm256_and_si256(hdr, _mm256_set1_epi32(0xFFFF))), pack(_mm256_srli_epi32::<16>(hdr)))
}

/// Dots of `R` consecutive weight rows (from `w`, `rb` bytes apart) with `N` activation
/// vectors; `out[r * N + t]`. Eight blocks per group: one gather per row fetches the group's
/// weight scales (and Q4_1's minimums), which are multiplied by the activation scales in one
/// go; each block then broadcasts its lane. Several rows share the activation loads and give
/// the core independent chains to interleave.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const KIND: u8, const R: usize, const N: usize>(w: *const u8, rb: usize, acts: [&ActQ; N], out: &mut [f32]) {
    let bb = block_bytes(KIND);
    let nb = acts[0].d.len();
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let offs = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(bb as i32));
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut macc = [[_mm256_setzero_ps(); N]; R];
    let mut g = 0;
    while g < nb {
        let n = (nb - g).min(8);
        let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
        let mut s = [[_mm256_setzero_ps(); N]; R];
        for r in 0..R {
            let hdr = _mm256_mask_i32gather_epi32::<1>(_mm256_setzero_si256(), w.add(r * rb + g * bb) as *const i32, offs, live);
            let (dw, mw) = halves(hdr);
            for t in 0..N {
                s[r][t] = _mm256_mul_ps(dw, _mm256_maskload_ps(acts[t].d.as_ptr().add(g), live));
                if KIND == Q4_1 {
                    macc[r][t] = _mm256_fmadd_ps(mw, _mm256_maskload_ps(acts[t].sum.as_ptr().add(g), live), macc[r][t]);
                }
            }
        }
        for j in 0..n {
            let b = g + j;
            let idx = _mm256_set1_epi32(j as i32);
            let mut x = [[_mm256_setzero_si256(); 2]; N];
            for t in 0..N {
                let a = acts[t].wide.as_ptr().add(b * BLOCK) as *const __m256i;
                x[t] = [_mm256_loadu_si256(a), _mm256_loadu_si256(a.add(1))];
            }
            for r in 0..R {
                if j == 0 {
                    // The next group's weights (the hardware prefetcher alone leaves the
                    // kernel waiting on memory when the matrix streams from DRAM).
                    // May point past the matrix: a prefetch never faults. A group is 144-272
                    // bytes (Q4_0 to Q8_0): 3 to 5 cache lines.
                    let ahead = w.wrapping_add(r * rb + b * bb + PREFETCH);
                    for line in 0..(8 * bb).div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                    }
                }
                let (w0, w1) = weights::<KIND>(w.add(r * rb + b * bb));
                for t in 0..N {
                    let i = _mm256_add_epi32(_mm256_madd_epi16(w0, x[t][0]), _mm256_madd_epi16(w1, x[t][1]));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_permutevar8x32_ps(s[r][t], idx), acc[r][t]);
                }
            }
        }
        g += n;
    }
    for r in 0..R {
        for t in 0..N {
            out[r * N + t] = hsum(_mm256_add_ps(acc[r][t], macc[r][t]));
        }
    }
}
