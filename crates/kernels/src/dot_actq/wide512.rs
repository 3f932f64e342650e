//! [`Format::Wide`] dots on AVX-512 (F + BW): a block's 32 weights widened to one register of 32
//! i16, one `vpmaddwd` per block and activation vector (32 products into 16 i32 lanes), converted
//! and scaled by one FMA whose scale is broadcast from memory. The 32 vector registers hold the
//! accumulators of up to eight vectors, so a batch of tokens unpacks each block once. A vector
//! costs three instructions per block, two of them on port 0 of an Intel server core (multiply,
//! convert), against about six for the planes (three byte dots, converts and sign fix-ups per
//! pair of blocks).

use super::kind::{block_bytes, Q4_0, Q4_1, Q8_0};
use super::*;
use std::arch::x86_64::*;

/// Most activation vectors per kernel call (a batch of 16 tokens takes two calls per row run).
const MAX_N: usize = 8;

/// `out[r * acts.len() + t]` for the rows of `w` (`rb` bytes each): rows in pairs for up to four
/// vectors, one at a time for five to eight, vectors in runs of eight beyond.
#[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
pub(super) unsafe fn dispatch<const KIND: u8>(w: &[u8], rb: usize, acts: &[&ActQ], out: &mut [f32]) {
    let n = acts.len();
    let nrows = w.len() / rb;
    for (c, part) in acts.chunks(MAX_N).enumerate() {
        let o = out.as_mut_ptr().add(c * MAX_N);
        let mut r = 0;
        if part.len() <= 4 {
            while r + 2 <= nrows {
                let (p, o) = (w.as_ptr().add(r * rb), o.add(r * n));
                match part.len() {
                    1 => rows::<KIND, 2, 1>(p, rb, part.try_into().unwrap(), o, n),
                    2 => rows::<KIND, 2, 2>(p, rb, part.try_into().unwrap(), o, n),
                    3 => rows::<KIND, 2, 3>(p, rb, part.try_into().unwrap(), o, n),
                    _ => rows::<KIND, 2, 4>(p, rb, part.try_into().unwrap(), o, n),
                }
                r += 2;
            }
        }
        for r in r..nrows {
            let (p, o) = (w.as_ptr().add(r * rb), o.add(r * n));
            match part.len() {
                1 => rows::<KIND, 1, 1>(p, rb, part.try_into().unwrap(), o, n),
                2 => rows::<KIND, 1, 2>(p, rb, part.try_into().unwrap(), o, n),
                3 => rows::<KIND, 1, 3>(p, rb, part.try_into().unwrap(), o, n),
                4 => rows::<KIND, 1, 4>(p, rb, part.try_into().unwrap(), o, n),
                5 => rows::<KIND, 1, 5>(p, rb, part.try_into().unwrap(), o, n),
                6 => rows::<KIND, 1, 6>(p, rb, part.try_into().unwrap(), o, n),
                7 => rows::<KIND, 1, 7>(p, rb, part.try_into().unwrap(), o, n),
                _ => rows::<KIND, 1, 8>(p, rb, part.try_into().unwrap(), o, n),
            }
        }
    }
}

/// How far ahead of the current group the kernel prefetches weights, in bytes (decode on a 2-core
/// Emerald Rapids, alternating runs: 4096 about 4% faster than 2048, 8192 no better than 4096).
const PREFETCH: usize = 4096;

/// Byte shuffle that spreads a block's 16 packed bytes (broadcast to all four 128-bit lanes) over
/// 32 i16 lanes: lanes 0-15 take bytes 0-15 (their low nibbles are values 0-15), lanes 16-31 take
/// them again (their high nibbles are values 16-31). -1 zeroes the high byte of each i16.
static SPREAD: [i8; 64] = {
    let mut s = [-1i8; 64];
    let mut i = 0;
    while i < 32 {
        s[2 * i] = (i % 16) as i8;
        i += 1;
    }
    s
};

/// One block's 32 weights as 32 i16, in activation order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn weights<const KIND: u8>(p: *const u8) -> __m512i {
    if KIND == Q8_0 {
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(2) as *const __m256i));
    }
    let off = if KIND == Q4_0 { 2 } else { 4 };
    let q = _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(off) as *const __m128i));
    let v = _mm512_shuffle_epi8(q, _mm512_loadu_si512(SPREAD.as_ptr() as *const _));
    let v = _mm512_and_si512(_mm512_mask_srli_epi16::<4>(v, 0xFFFF_0000, v), _mm512_set1_epi16(0x0F));
    if KIND == Q4_0 {
        _mm512_sub_epi16(v, _mm512_set1_epi16(8))
    } else {
        v
    }
}

/// Dots of `R` consecutive weight rows (`rb` bytes apart from `w`) with `N` activation vectors,
/// written to `out[r * stride + t]`. Sixteen blocks per group: one gather per row fetches their
/// scales (and Q4_1's minimums); the products with the activation scales go to a small table
/// that each block's FMA reads as a broadcast. The Q4_1 minimum terms go into the same
/// accumulators (only their lane sum matters).
// Rows, vectors and blocks index several arrays in step: index loops read best.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
unsafe fn rows<const KIND: u8, const R: usize, const N: usize>(w: *const u8, rb: usize, acts: [&ActQ; N], out: *mut f32, stride: usize) {
    let bb = block_bytes(KIND);
    let nb = acts[0].d.len();
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let offs = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(bb as i32));
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut scale = [[[0f32; 16]; N]; R];
    let live = |g: usize| -> __mmask16 { ((1u32 << (nb - g).min(16)) - 1) as u16 };
    let gather = |g: usize| -> [__m512i; R] {
        std::array::from_fn(|r| _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), live(g), offs, w.add(r * rb + g * bb) as *const i32))
    };
    // Each group's headers are gathered while the group before it runs (a gather's latency
    // left exposed cost a third of the kernel's time).
    let mut next = gather(0);
    let mut g = 0;
    while g < nb {
        let n = (nb - g).min(16);
        let hdrs = next;
        if g + n < nb {
            next = gather(g + n);
        }
        let live = live(g);
        for (r, &hdr) in hdrs.iter().enumerate() {
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hdr));
            let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hdr)));
            for t in 0..N {
                let s = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(live, acts[t].d.as_ptr().add(g)));
                _mm512_storeu_ps(scale[r][t].as_mut_ptr(), s);
                if KIND == Q4_1 {
                    acc[r][t] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(live, acts[t].sum.as_ptr().add(g)), acc[r][t]);
                }
            }
            // The next groups' weights: the hardware prefetcher alone leaves the kernel waiting
            // when the matrix streams from DRAM. May point past the matrix: a prefetch never faults.
            let ahead = w.wrapping_add(r * rb + g * bb + PREFETCH);
            for line in 0..(16 * bb).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
            }
        }
        for j in 0..n {
            let b = g + j;
            let x: [__m512i; N] = std::array::from_fn(|t| _mm512_loadu_si512(acts[t].wide.as_ptr().add(b * BLOCK) as *const _));
            for r in 0..R {
                let wv = weights::<KIND>(w.add(r * rb + b * bb));
                for t in 0..N {
                    let i = _mm512_madd_epi16(wv, x[t]);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(scale[r][t][j]), acc[r][t]);
                }
            }
        }
        g += n;
    }
    for r in 0..R {
        for t in 0..N {
            *out.add(r * stride + t) = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}
