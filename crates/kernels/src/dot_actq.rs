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
//!   With AVX-512 VNNI and VBMI (`wide512`): four blocks at a time against activations stored in
//!   the interleaved order of [`ActQ::interleaved`], so the products of four blocks add up in i32
//!   (`vpdpwssd`) before one convert and one FMA; up to eight vectors per pass over the weights.
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

/// Whether this CPU runs the AVX-512 [`Format::Wide`] kernel (`wide512`: F, BW, VL, VNNI, VBMI),
/// which reads [`ActQ::interleaved`].
pub(crate) fn interleaved_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| vnni() && avx2() && is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512vl"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Blocks per interleaved group.
const GROUP: usize = 4;

/// Which value of a four-block group lane `l` (0-31) of the group's `v`-th i16 vector (0-3)
/// holds: block `(l % 8) / 2`, so that each i32 lane of a `vpdpwssd` sums products of one block
/// (block = i32 lane mod 4) and four vectors' products add up in i32 before one conversion.
/// Within the block, the values whose packed bytes the AVX-512 kernel puts in one 16-bit word,
/// so that shifts and masks of that word yield all four vectors: packed bytes `j = 4L + 2e`
/// (low byte) and `j + 1` (high byte) for lane `l = 8L + 2·block + e`; vectors 0 and 1 take the
/// low byte's values (`j`, `j + 16`), vectors 2 and 3 the high byte's.
const fn interleaved_source(v: usize, l: usize) -> usize {
    let (lane, block, e) = (l / 8, (l % 8) / 2, l % 2);
    let value = 4 * lane + 2 * e + v / 2 + 16 * (v % 2);
    BLOCK * block + value
}

/// Source index within a group of [`GROUP`] blocks of each position of the interleaved layout
/// ([`interleaved_source`]).
pub(crate) const INTERLEAVE: [u8; GROUP * BLOCK] = {
    let mut t = [0u8; GROUP * BLOCK];
    let mut i = 0;
    while i < t.len() {
        t[i] = interleaved_source(i / BLOCK, i % BLOCK) as u8;
        i += 1;
    }
    t
};

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
/// weights are unpacked once per block for up to four vectors at a time, eight with the AVX-512
/// i16 kernel (speculative verification, small batches).
pub fn dot_many(ty: QuantType, row: &[u8], acts: &[&ActQ], out: &mut [f32]) {
    assert_eq!(acts.len(), out.len(), "dot_many: one output per activation vector");
    for a in acts {
        assert_eq!(Some(row.len()), ty.row_bytes(a.len()), "dot_actq {}: row/vector size mismatch", ty.name());
        assert_eq!(a.format, acts[0].format, "dot_many: activation vectors in different formats");
        assert!(a.is_complete(), "dot_many: an activation vector's buffers do not match its length (fill it with ActQ::quantize)");
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
    if format == Format::Wide && interleaved_kernel() && matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) {
        // SAFETY: AVX-512 F/BW/VNNI/VBMI, FMA and F16C detected by interleaved_kernel(); sizes
        // checked by the caller; quantize() filled the interleaved values on such a CPU.
        return unsafe {
            match ty {
                QuantType::Q4_0 => wide512::dispatch::<{ kind::Q4_0 }>(w, rb, acts, out),
                QuantType::Q4_1 => wide512::dispatch::<{ kind::Q4_1 }>(w, rb, acts, out),
                _ => wide512::dispatch::<{ kind::Q8_0 }>(w, rb, acts, out),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if format == Format::Wide && avx2() && matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) {
        // SAFETY: AVX2, FMA and F16C detected by avx2(); sizes checked by the caller.
        let run = |w: &[u8], acts: &[&ActQ], out: &mut [f32]| unsafe {
            match ty {
                QuantType::Q4_0 => wide::dispatch::<{ kind::Q4_0 }>(w, rb, acts, out),
                QuantType::Q4_1 => wide::dispatch::<{ kind::Q4_1 }>(w, rb, acts, out),
                _ => wide::dispatch::<{ kind::Q8_0 }>(w, rb, acts, out),
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
                    (QuantType::Q4_0, n) => avx512::dispatch::<{ kind::Q4_0 }>(row, acts, out, n),
                    (QuantType::Q4_1, n) => avx512::dispatch::<{ kind::Q4_1 }>(row, acts, out, n),
                    (QuantType::Q8_0, n) => avx512::dispatch::<{ kind::Q8_0 }>(row, acts, out, n),
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
                    QuantType::Q4_0 => avx2::dispatch::<{ kind::Q4_0 }>(row, acts, out),
                    QuantType::Q4_1 => avx2::dispatch::<{ kind::Q4_1 }>(row, acts, out),
                    _ => avx2::dispatch::<{ kind::Q8_0 }>(row, acts, out),
                }
            }
        }
        return;
    }
    for (o, a) in out.iter_mut().zip(acts) {
        *o = dot_reference(ty, row, a);
    }
}

/// The block types of the SIMD kernels, as their const-generic parameter.
#[cfg(target_arch = "x86_64")]
pub(crate) mod kind {
    use crate::quant::QuantType;

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// Bytes per block of `kind`.
    pub const fn block_bytes(kind: u8) -> usize {
        match kind {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        }
    }

    /// The block type of `kind`.
    pub const fn quant_type(kind: u8) -> QuantType {
        match kind {
            Q4_0 => QuantType::Q4_0,
            Q4_1 => QuantType::Q4_1,
            _ => QuantType::Q8_0,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod wide;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod wide512;
#[cfg(target_arch = "x86_64")]
pub(crate) use wide512::dpwssd;

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

    /// `nrows` random rows of `ty` against `n` vectors in `format`, through `run(w, rb, acts, out)`
    /// (`out[r * n + t]`; it returns how many leading rows it computed), each result checked
    /// against [`dot_reference`].
    fn rows_equal(ty: QuantType, format: Format, seed: u64, blocks: usize, n: usize, nrows: usize, run: impl FnOnce(&[u8], usize, &[&ActQ], &mut [f32]) -> usize) -> Result<(), TestCaseError> {
        let k = blocks * 32;
        let rows: Vec<Vec<u8>> = (0..nrows).map(|r| ty.quantize_row(&data(seed ^ (r as u64 * 31), k, false))).collect();
        let acts: Vec<ActQ> = (0..n).map(|t| quantized(format, &data(seed ^ (t as u64 + 7), k, t % 2 == 1))).collect();
        let refs: Vec<&ActQ> = acts.iter().collect();
        let mut out = vec![0f32; n * nrows];
        let checked = run(&rows.concat(), rows[0].len(), &refs, &mut out);
        for (r, row) in rows.iter().enumerate().take(checked) {
            for (t, a) in acts.iter().enumerate() {
                let (o, want) = (out[r * n + t], dot_reference(ty, row, a));
                let scale = 1.0 + (0..k).map(|i| a.value(i).abs()).sum::<f32>();
                prop_assert!((o - want).abs() <= 1e-5 * scale, "{} {format:?} row {r} vector {t}: {} vs {}", ty.name(), o, want);
            }
        }
        Ok(())
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
                    rows_equal(ty, format, seed, blocks, n, nrows, |w, rb, refs, out| {
                        // SAFETY: AVX2, FMA and F16C detected by avx2(); rows and vectors are k
                        // long, in the format each kernel reads.
                        unsafe {
                            match (ty, format) {
                                (QuantType::Q4_0, Format::Planes) => avx2::dispatch::<{ kind::Q4_0 }>(&w[..rb], refs, &mut out[..n]),
                                (QuantType::Q4_1, Format::Planes) => avx2::dispatch::<{ kind::Q4_1 }>(&w[..rb], refs, &mut out[..n]),
                                (_, Format::Planes) => avx2::dispatch::<{ kind::Q8_0 }>(&w[..rb], refs, &mut out[..n]),
                                (QuantType::Q4_0, Format::Wide) => wide::dispatch::<{ kind::Q4_0 }>(w, rb, refs, out),
                                (QuantType::Q4_1, Format::Wide) => wide::dispatch::<{ kind::Q4_1 }>(w, rb, refs, out),
                                (_, Format::Wide) => wide::dispatch::<{ kind::Q8_0 }>(w, rb, refs, out),
                            }
                        }
                        // The planes kernel takes one row.
                        if format == Format::Wide { nrows } else { 1 }
                    })?;
                }
            }
        }

        /// The batched path as the matmul calls it: runs of rows against 1-16 vectors (the AVX-512
        /// wide kernel takes vectors eight at a time and rows in pairs up to four).
        #[test]
        fn rows_equal_reference(seed in 1u64..u64::MAX, blocks in 1usize..40, n in 1usize..17, nrows in 1usize..6) {
            for (ty, format) in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0].into_iter().flat_map(|t| FORMATS.map(|f| (t, f))) {
                rows_equal(ty, format, seed, blocks, n, nrows, |w, rb, refs, out| {
                    dot_rows_unchecked(ty, w, rb, refs, out);
                    nrows
                })?;
            }
        }

        /// A vector's dot products are the same bits whatever batch it is in (speculative
        /// verification must reproduce plain decoding exactly), for every row of a run.
        #[test]
        fn batch_does_not_change_a_vector(seed in 1u64..u64::MAX, blocks in 1usize..40, n in 2usize..17, nrows in 1usize..6) {
            for (ty, format) in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0].into_iter().flat_map(|t| FORMATS.map(|f| (t, f))) {
                let k = blocks * 32;
                let w: Vec<u8> = (0..nrows).flat_map(|r| ty.quantize_row(&data(seed ^ (r as u64 * 31), k, false))).collect();
                let rb = w.len() / nrows;
                let acts: Vec<ActQ> = (0..n).map(|t| quantized(format, &data(seed ^ (t as u64 + 3), k, t % 3 == 0))).collect();
                let refs: Vec<&ActQ> = acts.iter().collect();
                let mut batch = vec![0f32; n * nrows];
                dot_rows_unchecked(ty, &w, rb, &refs, &mut batch);
                for (t, a) in refs.iter().enumerate() {
                    let mut alone = vec![0f32; nrows];
                    dot_rows_unchecked(ty, &w, rb, &[a], &mut alone);
                    for r in 0..nrows {
                        prop_assert_eq!(batch[r * n + t].to_bits(), alone[r].to_bits(), "{} {:?} row {} vector {} of {}", ty.name(), format, r, t, n);
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
