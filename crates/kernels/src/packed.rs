//! Q4_0 / Q4_1 / Q8_0 weights repacked at load time for the AVX-512 integer kernel: sixteen rows
//! per group, one row per 32-bit lane, so that a `vpdpwssd` multiplies sixteen rows by one pair
//! of [`Format::Wide`] activations (broadcast) and every token of a batch reuses the unpacked
//! weights from registers. The GGUF layout puts a row's values in the lanes instead: each (row,
//! token) pair then needs its own accumulator, a scale per four blocks and a horizontal sum,
//! which capped an 8-token pass at about a third of the products' throughput.
//!
//! Layout: group `g` (rows `16g .. 16g + 16`) holds its blocks in order, each [`group_bytes`]
//! long. Q4: four 64-byte vectors, where 16-bit word `e = 2l + h` of vector `q` holds in nibble
//! `s` the value `j = 2(4q + s) + h` of row `l`'s block (j < 16: the low nibble of byte j, else
//! the high nibble of byte j - 16, as in GGUF); then the 16 rows' scales `d` (f16), and for Q4_1
//! their minimums `m` (f16). Q8_0: sixteen 32-byte vectors, byte `e = 2l + h` of vector `p` being
//! value `2p + h` of row `l`, then the scales. Pairs of values in a lane are what one i32 lane of
//! `vpdpwssd` sums.
//!
//! A row's result does not depend on how many tokens or groups share a pass: each lane runs the
//! same integer sums and the same f32 operations in the same order (speculative verification
//! reproduces plain decoding bit for bit). [`Packed::raw_row`] rebuilds the GGUF bytes of a row,
//! so the scalar twin is [`crate::dot_actq::dot_reference`] on those.

use crate::actq::{ActQ, Format, BLOCK};
use crate::quant::QuantType;

/// Rows per group: one per i32 lane of a 512-bit register.
pub const GROUP_ROWS: usize = 16;

/// Bytes of one block of a 16-row group.
pub const fn group_bytes(ty: QuantType) -> usize {
    match ty {
        QuantType::Q4_0 => 256 + 32,
        QuantType::Q4_1 => 256 + 64,
        _ => 512 + 32,
    }
}

/// A `rows × k` matrix of Q4_0, Q4_1 or Q8_0 blocks in the grouped layout.
#[derive(Debug, Clone)]
pub struct Packed {
    ty: QuantType,
    rows: usize,
    k: usize,
    data: Vec<u8>,
}

/// Whether this CPU runs the packed kernel (AVX-512 F/BW/VNNI, F16C, FMA).
pub fn available() -> bool {
    crate::dot_actq::vnni() && crate::cpu::isa() != crate::cpu::Isa::Scalar
}

/// One group's blocks (`raw`: its 16 rows of `nb` GGUF blocks) into `dst` in the grouped layout.
fn pack_group(ty: QuantType, raw: &[u8], nb: usize, dst: &mut [u8]) {
    let (bb, gb) = (ty.block_bytes(), group_bytes(ty));
    for (b, dst) in dst.chunks_exact_mut(gb).enumerate() {
        let (values, scales) = if ty == QuantType::Q8_0 { dst.split_at_mut(512) } else { dst.split_at_mut(256) };
        for l in 0..GROUP_ROWS {
            let blk = &raw[(l * nb + b) * bb..(l * nb + b + 1) * bb];
            scales[2 * l..2 * l + 2].copy_from_slice(&blk[..2]);
            if ty == QuantType::Q8_0 {
                for j in 0..BLOCK {
                    values[32 * (j / 2) + 2 * l + j % 2] = blk[2 + j];
                }
                continue;
            }
            let qs = if ty == QuantType::Q4_0 { &blk[2..18] } else { &blk[4..20] };
            if ty == QuantType::Q4_1 {
                scales[32 + 2 * l..32 + 2 * l + 2].copy_from_slice(&blk[2..4]);
            }
            let nib = |j: usize| u16::from(if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 });
            for q in 0..4 {
                for h in 0..2 {
                    let word = (0..4).fold(0u16, |w, s| w | nib(2 * (4 * q + s) + h) << (4 * s));
                    let at = 64 * q + 2 * (2 * l + h);
                    values[at..at + 2].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
    }
}

impl Packed {
    /// Repack `raw` (GGUF blocks, `rows × k`), or `None` when the type has no packed kernel, the
    /// rows do not fill whole groups or the sizes do not match.
    pub fn new(ty: QuantType, raw: &[u8], rows: usize, k: usize) -> Option<Packed> {
        if !matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0) || !rows.is_multiple_of(GROUP_ROWS) || !k.is_multiple_of(BLOCK) {
            return None;
        }
        let (bb, nb) = (ty.block_bytes(), k / BLOCK);
        if raw.len() != rows * nb * bb {
            return None;
        }
        let gb = group_bytes(ty);
        let mut data = vec![0u8; rows / GROUP_ROWS * nb * gb];
        let out = crate::pool::SyncPtr::new(data.as_mut_ptr());
        // Groups in parallel: a model's worth takes a fraction of a second on one thread.
        crate::pool::global().for_chunks(rows / GROUP_ROWS, 16, &|groups| {
            for g in groups {
                // SAFETY: group g's bytes, written by this chunk alone.
                let dst = unsafe { out.slice(g * nb * gb, nb * gb) };
                pack_group(ty, &raw[g * GROUP_ROWS * nb * bb..(g + 1) * GROUP_ROWS * nb * bb], nb, dst);
            }
        });
        Some(Packed { ty, rows, k, data })
    }

    /// The block type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `r`'s GGUF blocks, rebuilt (`dst`: the row's bytes).
    pub fn raw_row(&self, r: usize, dst: &mut [u8]) {
        let (ty, nb, gb, bb) = (self.ty, self.k / BLOCK, group_bytes(self.ty), self.ty.block_bytes());
        assert_eq!(dst.len(), nb * bb, "Packed::raw_row: the row has {} bytes", nb * bb);
        let (g, l) = (r / GROUP_ROWS, r % GROUP_ROWS);
        for (b, blk) in dst.chunks_exact_mut(bb).enumerate() {
            let src = &self.data[(g * nb + b) * gb..(g * nb + b + 1) * gb];
            let (values, scales) = if ty == QuantType::Q8_0 { src.split_at(512) } else { src.split_at(256) };
            blk[..2].copy_from_slice(&scales[2 * l..2 * l + 2]);
            match ty {
                QuantType::Q8_0 => {
                    for j in 0..BLOCK {
                        blk[2 + j] = values[32 * (j / 2) + 2 * l + j % 2];
                    }
                }
                _ => {
                    let at = if ty == QuantType::Q4_0 { 2 } else { 4 };
                    if ty == QuantType::Q4_1 {
                        blk[2..4].copy_from_slice(&scales[32 + 2 * l..32 + 2 * l + 2]);
                    }
                    blk[at..at + 16].fill(0);
                    for j in 0..BLOCK {
                        let (kp, h) = (j / 2, j % 2);
                        let word = 64 * (kp / 4) + 2 * (2 * l + h);
                        let nib = (u16::from_le_bytes([values[word], values[word + 1]]) >> (4 * (kp % 4))) as u8 & 0xF;
                        blk[at + j % 16] |= if j < 16 { nib } else { nib << 4 };
                    }
                }
            }
        }
    }

    /// `y[t * stride + r] = row_r · x_t` for the rows of groups `groups` (`y` starts at row
    /// `16 · groups.start` of token 0). Needs [`available`], activations in [`Format::Wide`] of
    /// length `k`, and `y` to hold every element written.
    ///
    /// # Safety
    /// `y` must be valid for those writes; no other thread may write them meanwhile.
    pub unsafe fn dot_groups(&self, groups: std::ops::Range<usize>, acts: &[&ActQ], y: *mut f32, stride: usize) {
        assert!(available(), "Packed::dot_groups: this CPU lacks AVX-512 VNNI");
        assert!(groups.end * GROUP_ROWS <= self.rows, "Packed::dot_groups: groups past the matrix");
        for a in acts {
            assert!(a.format == Format::Wide && a.len() == self.k && a.is_complete(), "Packed::dot_groups: activations must be i16 of length {}", self.k);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let nb = self.k / BLOCK;
            let p = self.data.as_ptr().add(groups.start * nb * group_bytes(self.ty));
            match self.ty {
                QuantType::Q4_0 => kernel::dispatch::<{ kernel::Q4_0 }>(p, nb, groups.len(), acts, y, stride),
                QuantType::Q4_1 => kernel::dispatch::<{ kernel::Q4_1 }>(p, nb, groups.len(), acts, y, stride),
                _ => kernel::dispatch::<{ kernel::Q8_0 }>(p, nb, groups.len(), acts, y, stride),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::GROUP_ROWS;
    use crate::actq::{ActQ, BLOCK};
    use crate::dot_actq::dpwssd;
    pub(super) use crate::dot_actq::kind::{quant_type, Q4_0, Q4_1, Q8_0};
    use std::arch::x86_64::*;

    /// [`super::group_bytes`] of the block type `kind`.
    const fn group_bytes(kind: u8) -> usize {
        super::group_bytes(quant_type(kind))
    }

    /// Most activation vectors per pass.
    const MAX_N: usize = 8;

    /// Groups in runs of `R`, vectors in runs of eight. Up to four vectors take runs of four
    /// groups: more streams of weights in flight, which at 256 cached positions cut a 3-token
    /// pass by 13% and a 4-token pass by 10% on the Zen 4 box (the products' accumulators then
    /// spill, which matters less than the memory stalls). From five vectors on, runs of two.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    pub(super) unsafe fn dispatch<const KIND: u8>(p: *const u8, nb: usize, groups: usize, acts: &[&ActQ], y: *mut f32, stride: usize) {
        for (c, part) in acts.chunks(MAX_N).enumerate() {
            let y = y.add(c * MAX_N * stride);
            macro_rules! run {
                ($r:literal, $n:literal) => {{
                    let a: [&ActQ; $n] = part.try_into().unwrap();
                    let full = groups / $r;
                    groups_of::<KIND, $r, $n>(p, nb, full, a, y, stride);
                    let done = full * $r;
                    groups_of::<KIND, 1, $n>(p.add(done * nb * group_bytes(KIND)), nb, groups - done, a, y.add(done * GROUP_ROWS), stride);
                }};
            }
            match part.len() {
                1 => run!(4, 1),
                2 => run!(4, 2),
                3 => run!(4, 3),
                4 => run!(4, 4),
                5 => run!(2, 5),
                6 => run!(2, 6),
                7 => run!(2, 7),
                _ => run!(2, 8),
            }
        }
    }

    /// Weight vector `s` (0-3) of a Q4 vector `q`: nibble `s` of each 16-bit word.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn nibbles<const KIND: u8>(q: __m512i, s: usize) -> __m512i {
        let m = _mm512_set1_epi16(0xF);
        let v = match s {
            0 => _mm512_and_si512(q, m),
            1 => _mm512_and_si512(_mm512_srli_epi16::<4>(q), m),
            2 => _mm512_and_si512(_mm512_srli_epi16::<8>(q), m),
            _ => _mm512_srli_epi16::<12>(q),
        };
        if KIND == Q4_0 {
            _mm512_sub_epi16(v, _mm512_set1_epi16(8))
        } else {
            v
        }
    }

    /// How far ahead of a group's current block its bytes are prefetched: into L2 (`T1`) for
    /// up to four tokens, into L1 (`T0`) for more. On the Zen 4 box, decode (memory-bound) ran
    /// 10-30% faster with `T1` in ten alternating pairs at depths 0 to 512, and 3- and 4-token
    /// passes gained too, while 6- and 8-token passes and prefill chunks (compute-bound) ran
    /// 4-15% slower with it (BENCHMARKS.md). Distances of 1-8 KiB did the same. The
    /// GGUF-layout kernels (`dot_actq`) keep `T0`, which was faster for them at one token too.
    const PREFETCH: usize = 2048;

    /// `steps` runs of `R` consecutive groups from `p`, each against `N` vectors.
    // Groups and vectors index several arrays in step: index loops read best.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    unsafe fn groups_of<const KIND: u8, const R: usize, const N: usize>(p: *const u8, nb: usize, steps: usize, acts: [&ActQ; N], y: *mut f32, stride: usize) {
        let gb = group_bytes(KIND);
        let gstride = nb * gb;
        let wide: [*const i16; N] = std::array::from_fn(|t| acts[t].wide.as_ptr());
        for step in 0..steps {
            let base = p.add(step * R * gstride);
            let mut f = [[_mm512_setzero_ps(); N]; R];
            for b in 0..nb {
                let blk: [*const u8; R] = std::array::from_fn(|r| base.add(r * gstride + b * gb));
                for r in 0..R {
                    for line in 0..gb.div_ceil(64) {
                        let at = blk[r].wrapping_add(PREFETCH + 64 * line) as *const i8;
                        if N <= 4 {
                            _mm_prefetch::<_MM_HINT_T1>(at);
                        } else {
                            _mm_prefetch::<_MM_HINT_T0>(at);
                        }
                    }
                }
                let mut i = [[_mm512_setzero_si512(); N]; R];
                let mut pair = |kp: usize, w: [__m512i; R]| {
                    for t in 0..N {
                        let a = _mm512_set1_epi32((wide[t].add(b * BLOCK + 2 * kp) as *const i32).read_unaligned());
                        for r in 0..R {
                            i[r][t] = dpwssd(i[r][t], w[r], a);
                        }
                    }
                };
                if KIND == Q8_0 {
                    for kp in 0..BLOCK / 2 {
                        pair(kp, std::array::from_fn(|r| _mm512_cvtepi8_epi16(_mm256_loadu_si256(blk[r].add(32 * kp) as *const __m256i))));
                    }
                } else {
                    for q in 0..4 {
                        let v: [__m512i; R] = std::array::from_fn(|r| _mm512_loadu_si512(blk[r].add(64 * q) as *const _));
                        for s in 0..4 {
                            pair(4 * q + s, std::array::from_fn(|r| nibbles::<KIND>(v[r], s)));
                        }
                    }
                }
                let at = if KIND == Q8_0 { 512 } else { 256 };
                for r in 0..R {
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk[r].add(at) as *const __m256i));
                    for t in 0..N {
                        let s = _mm512_mul_ps(dw, _mm512_set1_ps(*acts[t].d.get_unchecked(b)));
                        f[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[r][t]), s, f[r][t]);
                    }
                    if KIND == Q4_1 {
                        let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk[r].add(at + 32) as *const __m256i));
                        for t in 0..N {
                            f[r][t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*acts[t].sum.get_unchecked(b)), f[r][t]);
                        }
                    }
                }
            }
            for r in 0..R {
                for t in 0..N {
                    _mm512_storeu_ps(y.add(t * stride + (step * R + r) * GROUP_ROWS), f[r][t]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dot_actq::dot_reference;

    use crate::testdata::xorshift as data;

    fn matrix(ty: QuantType, rows: usize, k: usize, seed: u64) -> Vec<u8> {
        data(seed, rows * k).chunks(k).flat_map(|r| ty.quantize_row(r)).collect()
    }

    #[test]
    fn raw_rows_round_trip() {
        for ty in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0] {
            let (rows, k) = (48, 96);
            let raw = matrix(ty, rows, k, 7);
            let p = Packed::new(ty, &raw, rows, k).unwrap();
            let rb = raw.len() / rows;
            let mut row = vec![0u8; rb];
            for r in 0..rows {
                p.raw_row(r, &mut row);
                assert_eq!(row, raw[r * rb..(r + 1) * rb], "{} row {r}", ty.name());
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_pack() {
        let raw = matrix(QuantType::Q4_1, 16, 64, 1);
        assert!(Packed::new(QuantType::Q4_1, &raw, 16, 64).is_some());
        assert!(Packed::new(QuantType::Q4_1, &raw[..raw.len() - 1], 16, 64).is_none());
        let raw = matrix(QuantType::Q4_1, 8, 64, 1);
        assert!(Packed::new(QuantType::Q4_1, &raw, 8, 64).is_none(), "half a group");
        let raw = matrix(QuantType::Q4_K, 16, 256, 1);
        assert!(Packed::new(QuantType::Q4_K, &raw, 16, 256).is_none());
    }

    #[test]
    fn kernel_matches_the_scalar_twin_and_is_batch_invariant() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        for ty in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0] {
            // 7 groups: runs of 4 and of 2 with a remainder.
            let (rows, k) = (112, 160);
            let raw = matrix(ty, rows, k, 3);
            let p = Packed::new(ty, &raw, rows, k).unwrap();
            let rb = raw.len() / rows;
            let acts: Vec<ActQ> = (0..11)
                .map(|t| {
                    let mut a = ActQ::new(Format::Wide);
                    a.quantize(&data(100 + t, k));
                    a
                })
                .collect();
            let refs: Vec<&ActQ> = acts.iter().collect();
            for n in [1, 2, 3, 4, 5, 8, 11] {
                let mut y = vec![f32::NAN; n * rows];
                // SAFETY: y holds n × rows values.
                unsafe { p.dot_groups(0..rows / GROUP_ROWS, &refs[..n], y.as_mut_ptr(), rows) };
                for t in 0..n {
                    let mut one = vec![0f32; rows];
                    // SAFETY: one holds rows values.
                    unsafe { p.dot_groups(0..rows / GROUP_ROWS, &refs[t..t + 1], one.as_mut_ptr(), rows) };
                    assert_eq!(one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), y[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} n {n} token {t}", ty.name());
                    for r in 0..rows {
                        let want = dot_reference(ty, &raw[r * rb..(r + 1) * rb], &acts[t]);
                        let got = y[t * rows + r];
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{} n {n} token {t} row {r}: {got} vs {want}", ty.name());
                    }
                }
            }
            // A range of groups writes only those rows.
            let mut y = vec![0f32; rows];
            // SAFETY: y from row 32 holds the 3 groups' 48 values.
            unsafe { p.dot_groups(2..5, &refs[..1], y.as_mut_ptr().add(32), rows) };
            assert!(y[..32].iter().chain(&y[80..]).all(|&v| v == 0.0));
            assert!(y[32..80].iter().all(|&v| v != 0.0));
        }
    }
}
