//! Integer dot products of Q4_0 / Q4_1 / Q8_0 weight rows with [`ActQ`] activations.
//!
//! - [`Format::Planes`] with AVX-512 VNNI: `vpdpbusd` (64 unsigned-by-signed byte products per
//!   instruction), one instruction per activation plane, two weight blocks per iteration; or, on
//!   AVX2 machines, `vpmaddubsw` + `vpmaddwd` (32 byte products into 8 i32 lanes; a pair of
//!   products stays below the i16 limit: 128·127·2 < 2¹⁵), one block per iteration. Signed weights
//!   (Q8_0, and Q4_0's `q - 8`) enter as their absolute values, with the sign moved onto the
//!   activations.
//! - [`Format::Wide`] with AVX2: the block's weights widened to two vectors of 16 i16 in registers,
//!   then two `vpmaddwd` against the i16 activations (a pair of products: 2·128·32767 < 2³¹).
//!   Block scales come eight blocks at a time from one gather; rows go in pairs (shared
//!   activation loads, two independent chains), with the weights prefetched 2 KiB ahead.
//!
//! [`dot_reference`] is the scalar twin: the same integer arithmetic, so the two agree up to the
//! order of the final f32 additions.

use crate::actq::{ActQ, Format, BLOCK, STEP};
use crate::quant::{f16_at, QuantType};

/// Whether [`dot`] has a fast kernel for this type on this CPU.
pub fn supported(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) && (vnni() || avx2())
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::isa() != crate::cpu::Isa::Scalar && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has the AVX-512 VNNI byte dots that [`Format::Planes`] is built for.
pub(crate) fn vnni() -> bool {
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

/// One block's contribution, in scalar code: exact integer dots (three for planes, one for
/// wide) combined in f32.
fn block_reference(ty: QuantType, blk: &[u8], a: &ActQ, b: usize) -> f32 {
    let w = block_weights(ty, blk);
    let at = b * BLOCK;
    let t = match a.format {
        Format::Planes => {
            let plane = |p: usize| -> f32 { (0..32).map(|j| w[j] * a.planes[p][at + j] as i32).sum::<i32>() as f32 };
            plane(0) + plane(1) / STEP + plane(2) / (STEP * STEP)
        }
        Format::Wide => (0..32).map(|j| w[j] * a.wide[at + j] as i32).sum::<i32>() as f32,
    };
    let m = if ty == QuantType::Q4_1 { f16_at(blk, 2) * a.sum[b] } else { 0.0 };
    f16_at(blk, 0) * a.d[b] * t + m
}

/// Scalar twin of [`dot`].
pub fn dot_reference(ty: QuantType, row: &[u8], a: &ActQ) -> f32 {
    row.chunks_exact(ty.block_bytes()).enumerate().map(|(b, blk)| block_reference(ty, blk, a, b)).sum()
}

/// `row · x` where `a` holds `x` quantized. `ty` must be [`supported`].
pub fn dot(ty: QuantType, row: &[u8], a: &ActQ) -> f32 {
    let mut out = [0f32];
    dot_many(ty, row, &[a], &mut out);
    out[0]
}

/// `out[t] = row · x_t` for several quantized activation vectors (all in one format): the
/// weights are unpacked once per block for up to four vectors at a time (speculative
/// verification, small batches).
pub fn dot_many(ty: QuantType, row: &[u8], acts: &[&ActQ], out: &mut [f32]) {
    assert_eq!(acts.len(), out.len(), "dot_many: one output per activation vector");
    for a in acts {
        assert_eq!(Some(row.len()), ty.row_bytes(a.len()), "dot_actq {}: row/vector size mismatch", ty.name());
        assert_eq!(a.format, acts[0].format, "dot_many: activation vectors in different formats");
    }
    dot_many_unchecked(ty, row, acts, out)
}

/// [`dot_many`] without the size checks (callers check once per matrix, not once per row).
#[inline]
pub(crate) fn dot_many_unchecked(ty: QuantType, row: &[u8], acts: &[&ActQ], out: &mut [f32]) {
    dot_rows_unchecked(ty, row, row.len(), acts, out)
}

/// `out[r * acts.len() + t] = row_r · x_t` for the consecutive rows of `w`, `rb` bytes each
/// (sizes checked by the caller).
pub(crate) fn dot_rows_unchecked(ty: QuantType, w: &[u8], rb: usize, acts: &[&ActQ], out: &mut [f32]) {
    let n = acts.len();
    let format = acts.first().map_or(Format::Planes, |a| a.format);
    #[cfg(target_arch = "x86_64")]
    if format == Format::Wide && avx2() && matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) {
        // SAFETY: AVX2, FMA and F16C detected by avx2(); sizes checked by the caller.
        let run = |w: &[u8], acts: &[&ActQ], out: &mut [f32]| unsafe {
            match ty {
                QuantType::Q4_0 => wide::dispatch::<{ avx512::Q4_0 }>(w, rb, acts, out),
                QuantType::Q4_1 => wide::dispatch::<{ avx512::Q4_1 }>(w, rb, acts, out),
                _ => wide::dispatch::<{ avx512::Q8_0 }>(w, rb, acts, out),
            }
        };
        if n <= 4 {
            return run(w, acts, out);
        }
        for (row, out) in w.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
            for (acts, out) in acts.chunks(4).zip(out.chunks_mut(4)) {
                run(row, acts, out);
            }
        }
        return;
    }
    for (row, out) in w.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
        dot_row_planes(ty, row, acts, out);
    }
}

/// One row with activations in [`Format::Planes`] (or any format without a fast kernel here).
fn dot_row_planes(ty: QuantType, row: &[u8], acts: &[&ActQ], out: &mut [f32]) {
    let format = acts.first().map_or(Format::Planes, |a| a.format);
    #[cfg(target_arch = "x86_64")]
    if format == Format::Planes && vnni() {
        for (acts, out) in acts.chunks(4).zip(out.chunks_mut(4)) {
            // SAFETY: features detected by vnni(); sizes checked above.
            unsafe {
                match (ty, acts.len()) {
                    (QuantType::Q4_0, n) => avx512::dispatch::<{ avx512::Q4_0 }>(row, acts, out, n),
                    (QuantType::Q4_1, n) => avx512::dispatch::<{ avx512::Q4_1 }>(row, acts, out, n),
                    (QuantType::Q8_0, n) => avx512::dispatch::<{ avx512::Q8_0 }>(row, acts, out, n),
                    _ => {
                        for (o, a) in out.iter_mut().zip(acts) {
                            *o = dot_reference(ty, row, a);
                        }
                    }
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if format == Format::Planes && avx2() && matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) {
        for (acts, out) in acts.chunks(4).zip(out.chunks_mut(4)) {
            // SAFETY: AVX2, FMA and F16C detected by avx2(); sizes checked by the caller.
            unsafe {
                match ty {
                    QuantType::Q4_0 => avx2::dispatch::<{ avx512::Q4_0 }>(row, acts, out),
                    QuantType::Q4_1 => avx2::dispatch::<{ avx512::Q4_1 }>(row, acts, out),
                    _ => avx2::dispatch::<{ avx512::Q8_0 }>(row, acts, out),
                }
            }
        }
        return;
    }
    for (o, a) in out.iter_mut().zip(acts) {
        *o = dot_reference(ty, row, a);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::avx512::{Q4_0, Q4_1, Q8_0};
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
        let bb = super::avx512::block_bytes(KIND);
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
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::avx512::{block_bytes, Q4_0, Q4_1, Q8_0};
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
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    pub(super) const fn block_bytes(kind: u8) -> usize {
        match kind {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        }
    }

    const fn quant_type(kind: u8) -> QuantType {
        match kind {
            Q4_0 => QuantType::Q4_0,
            Q4_1 => QuantType::Q4_1,
            _ => QuantType::Q8_0,
        }
    }

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

    const FORMATS: [Format; 2] = [Format::Planes, Format::Wide];

    fn quantized(format: Format, x: &[f32]) -> ActQ {
        let mut a = ActQ::new(format);
        a.quantize(x);
        a
    }

    proptest! {
        #[test]
        fn many_equals_one_at_a_time(seed in 1u64..u64::MAX, blocks in 1usize..40, n in 1usize..7) {
            for (ty, format) in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0].into_iter().flat_map(|t| FORMATS.map(|f| (t, f))) {
                let k = blocks * 32;
                let row = ty.quantize_row(&data(seed, k, false));
                let acts: Vec<ActQ> = (0..n).map(|t| quantized(format, &data(seed ^ (t as u64 + 1), k, t % 2 == 0))).collect();
                let refs: Vec<&ActQ> = acts.iter().collect();
                let mut out = vec![0f32; n];
                dot_many(ty, &row, &refs, &mut out);
                for (o, a) in out.iter().zip(&acts) {
                    let r = dot_reference(ty, &row, a);
                    prop_assert!((o - r).abs() <= 1e-5 * (1.0 + r.abs() + k as f32 * 0.01), "{} {format:?}: {} vs {}", ty.name(), o, r);
                }
            }
        }

        /// Both AVX2 kernels on their own (on an AVX-512 machine planes never reach theirs), the
        /// wide one over several rows (pairs and a leftover row).
        #[test]
        fn avx2_kernels_equal_reference(seed in 1u64..u64::MAX, blocks in 1usize..40, n in 1usize..5, nrows in 1usize..6) {
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                for (ty, format) in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0].into_iter().flat_map(|t| FORMATS.map(|f| (t, f))) {
                    let k = blocks * 32;
                    let rows: Vec<Vec<u8>> = (0..nrows).map(|r| ty.quantize_row(&data(seed ^ (r as u64 * 31), k, false))).collect();
                    let w = rows.concat();
                    let rb = rows[0].len();
                    let acts: Vec<ActQ> = (0..n).map(|t| quantized(format, &data(seed ^ (t as u64 + 7), k, t % 2 == 1))).collect();
                    let refs: Vec<&ActQ> = acts.iter().collect();
                    let mut out = vec![0f32; n * nrows];
                    // SAFETY: AVX2, FMA and F16C detected by avx2(); rows and vectors are k long,
                    // in the format each kernel reads.
                    unsafe {
                        match (ty, format) {
                            (QuantType::Q4_0, Format::Planes) => avx2::dispatch::<{ avx512::Q4_0 }>(&w[..rb], &refs, &mut out[..n]),
                            (QuantType::Q4_1, Format::Planes) => avx2::dispatch::<{ avx512::Q4_1 }>(&w[..rb], &refs, &mut out[..n]),
                            (_, Format::Planes) => avx2::dispatch::<{ avx512::Q8_0 }>(&w[..rb], &refs, &mut out[..n]),
                            (QuantType::Q4_0, Format::Wide) => wide::dispatch::<{ avx512::Q4_0 }>(&w, rb, &refs, &mut out),
                            (QuantType::Q4_1, Format::Wide) => wide::dispatch::<{ avx512::Q4_1 }>(&w, rb, &refs, &mut out),
                            (_, Format::Wide) => wide::dispatch::<{ avx512::Q8_0 }>(&w, rb, &refs, &mut out),
                        }
                    }
                    let checked = if format == Format::Wide { nrows } else { 1 };
                    for (r, row) in rows.iter().enumerate().take(checked) {
                        for (t, a) in acts.iter().enumerate() {
                            let (o, want) = (out[r * n + t], dot_reference(ty, row, a));
                            let scale = 1.0 + (0..k).map(|i| a.value(i).abs()).sum::<f32>();
                            prop_assert!((o - want).abs() <= 1e-5 * scale, "{} {format:?} row {r}: avx2 {} ref {}", ty.name(), o, want);
                        }
                    }
                }
            }
        }

        #[test]
        fn fast_equals_reference_and_tracks_f32(seed in 1u64..u64::MAX, blocks in 1usize..40, outlier: bool) {
            for (ty, format) in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0].into_iter().flat_map(|t| FORMATS.map(|f| (t, f))) {
                let k = blocks * 32;
                let w = data(seed, k, false);
                let x = data(seed ^ 0x5555, k, outlier);
                let row = ty.quantize_row(&w);
                let a = quantized(format, &x);
                let r = dot_reference(ty, &row, &a);
                let scale = 1.0 + x.iter().map(|v| v.abs()).sum::<f32>();
                if supported(ty) {
                    let f = dot(ty, &row, &a);
                    prop_assert!((f - r).abs() <= 1e-5 * scale, "{} {format:?}: fast {} ref {}", ty.name(), f, r);
                }
                // Against the f32 dot: within the activation quantization error (|w| <= ~1.1).
                let exact = reference::dot_quant(ty, &row, &x);
                let bound: f32 = (0..k).map(|i| a.error_bound(i, x[i]) * 1.2).sum::<f32>() + 2e-5 * scale;
                prop_assert!((r - exact).abs() <= bound, "{} {format:?}: actq {} f32 {} bound {}", ty.name(), r, exact, bound);
            }
        }
    }
}
