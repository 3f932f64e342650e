//! [`Format::Wide`] dots on AVX-512 (F, BW, VL, VNNI, VBMI), in groups of four blocks. One
//! `vpermt2b` gathers a group's packed bytes so that shifts and masks of its 16-bit words spread
//! them over four registers of 32 i16 in [`INTERLEAVE`] order (each i32 lane of a product belongs
//! to one block). A vector then takes one `vpmaddwd` and three `vpdpwssd` against its interleaved
//! activations, and one convert and one FMA with the four blocks' scales: six multiply-class
//! instructions per four blocks where one block at a time needs twelve (multiply, convert and FMA
//! per block). A last partial group reads its missing blocks as zeros. The 32 vector registers
//! hold the accumulators of two rows and up to eight vectors, so a batch of tokens decodes each
//! group once and loads each activation line once per two rows (at eight vectors the loads, more
//! than the products, set the pace); a vector's arithmetic does not depend on how many share the
//! pass.

use super::kind::{block_bytes, Q4_0, Q4_1, Q8_0};
use super::*;
use std::arch::x86_64::*;

/// Most activation vectors per kernel call (a batch of 16 tokens takes two calls per row run).
const MAX_N: usize = 8;

/// `out[r * acts.len() + t]` for the rows of `w` (`rb` bytes each): rows in pairs (a last odd
/// row alone), vectors in runs of eight.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,fma")]
pub(super) unsafe fn dispatch<const KIND: u8>(w: &[u8], rb: usize, acts: &[&ActQ], out: &mut [f32]) {
    let n = acts.len();
    let nrows = w.len() / rb;
    for (c, part) in acts.chunks(MAX_N).enumerate() {
        let o = out.as_mut_ptr().add(c * MAX_N);
        let p = w.as_ptr();
        let pairs = nrows / 2;
        match part.len() {
            1 => rows::<KIND, 2, 1>(p, rb, pairs, part.try_into().unwrap(), o, n),
            2 => rows::<KIND, 2, 2>(p, rb, pairs, part.try_into().unwrap(), o, n),
            3 => rows::<KIND, 2, 3>(p, rb, pairs, part.try_into().unwrap(), o, n),
            4 => rows::<KIND, 2, 4>(p, rb, pairs, part.try_into().unwrap(), o, n),
            5 => rows::<KIND, 2, 5>(p, rb, pairs, part.try_into().unwrap(), o, n),
            6 => rows::<KIND, 2, 6>(p, rb, pairs, part.try_into().unwrap(), o, n),
            7 => rows::<KIND, 2, 7>(p, rb, pairs, part.try_into().unwrap(), o, n),
            _ => rows::<KIND, 2, 8>(p, rb, pairs, part.try_into().unwrap(), o, n),
        }
        let (r, single) = (2 * pairs, nrows - 2 * pairs);
        let (p, o) = (p.add(r * rb), o.add(r * n));
        match part.len() {
            1 => rows::<KIND, 1, 1>(p, rb, single, part.try_into().unwrap(), o, n),
            2 => rows::<KIND, 1, 2>(p, rb, single, part.try_into().unwrap(), o, n),
            3 => rows::<KIND, 1, 3>(p, rb, single, part.try_into().unwrap(), o, n),
            4 => rows::<KIND, 1, 4>(p, rb, single, part.try_into().unwrap(), o, n),
            5 => rows::<KIND, 1, 5>(p, rb, single, part.try_into().unwrap(), o, n),
            6 => rows::<KIND, 1, 6>(p, rb, single, part.try_into().unwrap(), o, n),
            7 => rows::<KIND, 1, 7>(p, rb, single, part.try_into().unwrap(), o, n),
            _ => rows::<KIND, 1, 8>(p, rb, single, part.try_into().unwrap(), o, n),
        }
    }
}

/// How far ahead of the current group the kernel prefetches weights, in bytes (decode on a 2-core
/// Emerald Rapids, alternating runs: 4096 about 4% faster than 2048, 8192 no better than 4096).
const PREFETCH: usize = 4096;

/// `vpermt2b` index that gathers a Q4 group's packed bytes (from the 128 bytes at its start) so
/// that shifts and masks of each 16-bit word yield the weights in [`INTERLEAVE`] order: word `l`
/// holds packed bytes `4L + 2e` and `4L + 2e + 1` of block `(l % 8) / 2` (`L = l / 8`, `e = l % 2`).
const fn q4_gather(kind: u8) -> [u8; 64] {
    let (bb, header) = (block_bytes(kind), if kind == Q4_0 { 2 } else { 4 });
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (l, high) = (i / 2, i % 2);
        t[i] = ((l % 8) / 2 * bb + header + 4 * (l / 8) + 2 * (l % 2) + high) as u8;
        i += 1;
    }
    t
}

static Q4_0_GATHER: [u8; 64] = q4_gather(Q4_0);
static Q4_1_GATHER: [u8; 64] = q4_gather(Q4_1);

/// The weights of the group at `p` as four registers of 32 i16, in [`INTERLEAVE`] order. `blocks`
/// (1-4) of its blocks exist; the others read as zero (nothing past them is loaded).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn group_weights<const KIND: u8>(p: *const u8, blocks: usize) -> [__m512i; GROUP] {
    if KIND == Q8_0 {
        // The four blocks' values side by side, then INTERLEAVE itself as the byte gather.
        let qs = |b: usize| _mm256_maskz_loadu_epi8(if b < blocks { !0 } else { 0 }, p.add(b * 34 + 2) as *const i8);
        let (lo, hi) = (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(qs(0)), qs(1)), _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qs(2)), qs(3)));
        let order = INTERLEAVE.as_ptr() as *const __m512i;
        let (a, b) = (_mm512_permutex2var_epi8(lo, _mm512_loadu_si512(order as *const _), hi), _mm512_permutex2var_epi8(lo, _mm512_loadu_si512(order.add(1) as *const _), hi));
        let wide = |v: __m512i, half: bool| _mm512_cvtepi8_epi16(if half { _mm512_extracti64x4_epi64::<1>(v) } else { _mm512_castsi512_si256(v) });
        return [wide(a, false), wide(a, true), wide(b, false), wide(b, true)];
    }
    // A whole group spans 72 (Q4_0) or 80 bytes: the loads stop at its end.
    let len = blocks * block_bytes(KIND);
    let mask = |from: usize| -> u64 {
        match len.saturating_sub(from) {
            0 => 0,
            n if n >= 64 => !0,
            n => (1 << n) - 1,
        }
    };
    let (lo, hi) = (_mm512_maskz_loadu_epi8(mask(0), p as *const i8), _mm512_maskz_loadu_epi8(mask(64), p.add(64) as *const i8));
    let gather = if KIND == Q4_0 { Q4_0_GATHER.as_ptr() } else { Q4_1_GATHER.as_ptr() };
    let q = _mm512_permutex2var_epi8(lo, _mm512_loadu_si512(gather as *const _), hi);
    let nibble = _mm512_set1_epi16(0x0F);
    let v = [
        _mm512_and_si512(q, nibble),
        _mm512_and_si512(_mm512_srli_epi16::<4>(q), nibble),
        _mm512_and_si512(_mm512_srli_epi16::<8>(q), nibble),
        _mm512_srli_epi16::<12>(q),
    ];
    if KIND == Q4_0 {
        // Absent blocks were zero bytes: their -8 meets zero activations.
        v.map(|v| _mm512_sub_epi16(v, _mm512_set1_epi16(8)))
    } else {
        v
    }
}

/// The lane sums of eight accumulators, each added in the same order (halves, then quarters, …),
/// so a sum does not depend on its neighbours: sixteen shuffles for all eight where one
/// `_mm512_reduce_add_ps` each takes five.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sums(v: [__m512; 8]) -> [f32; 8] {
    // Chunks [a0+a2, a1+a3, b0+b2, b1+b3] (128-bit chunks of a and b).
    let halves = |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    let h = [halves(v[0], v[1]), halves(v[2], v[3]), halves(v[4], v[5]), halves(v[6], v[7])];
    // Chunk i: vector i's four partial sums (v0-v3 in one register, v4-v7 in the other).
    let quarters = |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    let (q0, q1) = (quarters(h[0], h[1]), quarters(h[2], h[3]));
    // Chunk i: [vᵢ, vᵢ₊₄] as two partial sums each, then as totals.
    let x = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(q0, q1), _mm512_shuffle_ps::<0xEE>(q0, q1));
    let y = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(x, x), _mm512_shuffle_ps::<0xDD>(x, x));
    let mut s = [0f32; 16];
    _mm512_storeu_ps(s.as_mut_ptr(), y);
    [s[0], s[4], s[8], s[12], s[1], s[5], s[9], s[13]]
}

/// `acc + vpmaddwd(a, b)` as the one instruction `vpdpwssd`. Written as assembly: LLVM otherwise
/// splits the intrinsic back into `vpmaddwd` + `vpaddd` for CPUs it does not know to have fast
/// VNNI (every build without `target-cpu`), and the extra add costs a port-0/5 slot per product.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
pub(crate) unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    std::arch::asm!("vpdpwssd {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b, options(pure, nomem, nostack));
    acc
}

/// `$body` for `$t` = 0, 1, … below `$n` (at most 8), written out: LLVM leaves a loop over eight
/// vectors rolled, and the accumulators it indexes then live on the stack.
macro_rules! unroll8 {
    ($t:ident, $n:expr, $body:block) => {
        unroll8!(@ $t, $n, $body, 0, 1, 2, 3, 4, 5, 6, 7)
    };
    (@ $t:ident, $n:expr, $body:block, $($i:literal),*) => {
        $(if $i < $n {
            let $t = $i;
            $body
        })*
    };
}

/// One header group's products of weight and activation scales, on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Scales([f32; 16]);

/// Dots of `steps * R` consecutive weight rows (`rb` bytes apart from `w`), `R` at a time, with
/// `N` activation vectors, written to `out[r * stride + t]`. Sixteen blocks per header group: one
/// gather per row fetches their scales (and Q4_1's minimums); the products with the activation
/// scales go to a small table that each group's FMA reads as a broadcast. The Q4_1 minimum terms
/// go into the same accumulators (only their lane sum matters).
// Rows, vectors and blocks index several arrays in step: index loops read best.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,fma")]
unsafe fn rows<const KIND: u8, const R: usize, const N: usize>(w: *const u8, rb: usize, steps: usize, acts: [&ActQ; N], out: *mut f32, stride: usize) {
    if steps == 0 {
        return;
    }
    let bb = block_bytes(KIND);
    let nb = acts[0].d.len();
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let offs = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(bb as i32));
    let mut scale = [[Scales([0.0; 16]); N]; R];
    let live = |g: usize| -> __mmask16 { ((1u32 << (nb - g).min(16)) - 1) as u16 };
    let gather = |row: usize, g: usize| -> [__m512i; R] {
        std::array::from_fn(|r| _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), live(g), offs, w.add((row + r) * rb + g * bb) as *const i32))
    };
    // Each header group is gathered while the one before it runs, across rows too (a gather's
    // latency left exposed cost a third of the kernel's time).
    let mut next = gather(0, 0);
    for step in 0..steps {
        let row = step * R;
        let w = w.add(row * rb);
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut g = 0;
        while g < nb {
            let n = (nb - g).min(16);
            let hdrs = next;
            if g + n < nb {
                next = gather(row, g + n);
            } else if step + 1 < steps {
                next = gather(row + R, 0);
            }
            let live = live(g);
            for (r, &hdr) in hdrs.iter().enumerate() {
                let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hdr));
                let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hdr)));
                for t in 0..N {
                    let s = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(live, acts[t].d.as_ptr().add(g)));
                    _mm512_store_ps(scale[r][t].0.as_mut_ptr(), s);
                    if KIND == Q4_1 {
                        acc[r][t] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(live, acts[t].sum.as_ptr().add(g)), acc[r][t]);
                    }
                }
                // The next groups' weights: the hardware prefetcher alone leaves the kernel
                // waiting when the matrix streams from DRAM. May point past the matrix: a
                // prefetch never faults.
                let ahead = w.wrapping_add(r * rb + g * bb + PREFETCH);
                for line in 0..(16 * bb).div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
            }
            for j in (0..n).step_by(GROUP) {
                let b = g + j;
                let x: [*const __m512i; N] = std::array::from_fn(|t| acts[t].interleaved.as_ptr().add(b) as *const __m512i);
                let weights = |r: usize| group_weights::<KIND>(w.add(r * rb + b * bb), (n - j).min(GROUP));
                // The four blocks' i32 sums of row r and vector t into its f32 accumulator.
                let mut fold = |r: usize, t: usize, i: __m512i| {
                    let s = _mm512_broadcast_f32x4(_mm_load_ps(scale[r][t].0.as_ptr().add(j)));
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[r][t]);
                };
                if N <= 4 {
                    // A row at a time, each step for all vectors before the next: the four-deep
                    // chains of dependent products run side by side (single-token decode).
                    for r in 0..R {
                        let wv = weights(r);
                        let mut i: [__m512i; N] = std::array::from_fn(|t| _mm512_madd_epi16(wv[0], _mm512_load_si512(x[t] as *const _)));
                        for v in 1..GROUP {
                            for t in 0..N {
                                i[t] = dpwssd(i[t], wv[v], _mm512_load_si512(x[t].add(v) as *const _));
                            }
                        }
                        for t in 0..N {
                            fold(r, t, i[t]);
                        }
                    }
                } else {
                    // A vector at a time, each activation line loaded once for both rows: at
                    // eight vectors the loads, more than the products, set the pace.
                    let wv: [[__m512i; GROUP]; R] = std::array::from_fn(weights);
                    unroll8!(t, N, {
                        let a = _mm512_load_si512(x[t] as *const _);
                        let mut i: [__m512i; R] = std::array::from_fn(|r| _mm512_madd_epi16(wv[r][0], a));
                        for v in 1..GROUP {
                            let a = _mm512_load_si512(x[t].add(v) as *const _);
                            for r in 0..R {
                                i[r] = dpwssd(i[r], wv[r][v], a);
                            }
                        }
                        for r in 0..R {
                            fold(r, t, i[r]);
                        }
                    });
                }
            }
            g += n;
        }
        // One shuffle tree for every row when their vectors fit in it, else one per row.
        let per = if R * N <= 8 { R } else { 1 };
        for r0 in (0..R).step_by(per) {
            let mut all = [_mm512_setzero_ps(); 8];
            for r in r0..r0 + per {
                all[(r - r0) * N..(r - r0 + 1) * N].copy_from_slice(&acc[r]);
            }
            let sums = sums(all);
            for r in r0..r0 + per {
                for t in 0..N {
                    *out.add((row + r) * stride + t) = sums[(r - r0) * N + t];
                }
            }
        }
    }
}
