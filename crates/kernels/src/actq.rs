//! Activations quantized for integer dot products, in one of two formats ([`Format`]):
//!
//! - **Planes** (22 bits): three int8 planes. Per 32-value block with scale `d = max|x| / 127`:
//!   `hi = round(x / d)`, then the residual is quantized twice more at 254 times finer steps:
//!   `mid = round(r₁ · 254 / d)`, `lo = round(r₂ · 254² / d)`, so `x ≈ d · (hi + mid/254 + lo/254²)`
//!   with an error of at most `d / (2 · 254²)` (every plane stays within ±127 without clamping).
//!   A dot with a weight block is three exact i32 dot products combined in f32: one AVX-512 VNNI
//!   instruction per plane and 64 weights.
//! - **Wide** (16 bits): one i16 per value, `d = max|x| / 32767`, error at most `d / 2`. A dot with
//!   a weight block is one exact i32 dot product (`vpmaddwd` against weights widened to i16 in
//!   registers): a third of the planes' multiplies on AVX2, and on AVX-512 one instruction per
//!   block where the planes need three VNNI dots and a sign fix-up. The default ([`Format::native`]).
//!
//! Measured on the reference prompts (see BENCHMARKS.md): one int8 plane (llama.cpp's Q8 scheme)
//! moved top-10 logits by up to 1.12, two planes (15 bits) by up to 7.5e-3, three planes match the
//! f32 path (~7e-5). llama.cpp itself is 0.54 off on the same prompts.

/// Values per quantization block (equal to the weight block length of Q4_0/Q4_1/Q8_0).
pub const BLOCK: usize = 32;

/// Step ratio between planes.
pub const STEP: f32 = 254.0;

/// Largest magnitude of a [`Format::Wide`] value.
pub const WIDE_MAX: f32 = 32767.0;

/// How an [`ActQ`] holds its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Three int8 planes, about 22 bits.
    Planes,
    /// One i16 per value, 16 bits.
    Wide,
}

impl Format {
    /// The format with the fastest kernels on this CPU: i16 on AVX2 and on AVX-512 alike. With
    /// AVX-512 VNNI a byte product costs a quarter of an i16 one, but the planes need three of
    /// them and a sign fix-up per block where i16 needs one `vpmaddwd`: decode measured 1.55x
    /// faster with i16 on a 2-core Emerald Rapids (BENCHMARKS.md).
    pub fn native() -> Format {
        Format::Wide
    }
}

/// 32 i16 values on one 64-byte cache line: one register of the AVX-512 kernel, so that no load
/// of it splits a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C, align(64))]
pub struct Line(pub [i16; BLOCK]);

/// A quantized activation vector (length a multiple of [`BLOCK`]). Buffers are reused across calls.
#[derive(Debug, Clone)]
pub struct ActQ {
    /// Which of the value buffers below holds the values.
    pub format: Format,
    /// [`Format::Planes`]: the three planes, `[3][k]`: hi, mid, lo (empty otherwise).
    pub planes: [Vec<i8>; 3],
    /// [`Format::Wide`]: the values, `[k]` (empty otherwise).
    pub wide: Vec<i16>,
    /// [`Format::Wide`] on CPUs with the AVX-512 VNNI kernel: `wide` reordered four blocks at a
    /// time as that kernel reads it (`dot_actq::INTERLEAVE`), a last partial group padded with
    /// zeros (empty otherwise).
    pub interleaved: Vec<Line>,
    /// Scale per block, `[k / 32]`.
    pub d: Vec<f32>,
    /// Exact f32 sum of each block's values, `[k / 32]` (for the `m` term of Q4_1).
    pub sum: Vec<f32>,
}

impl Default for ActQ {
    /// An empty vector in this CPU's [`Format::native`] format.
    fn default() -> Self {
        ActQ::new(Format::native())
    }
}

/// Round to nearest (ties to even) without a libm call, so the loop vectorizes.
#[inline(always)]
fn round(v: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    (v + MAGIC) - MAGIC
}

impl ActQ {
    /// An empty vector in `format`.
    pub fn new(format: Format) -> ActQ {
        ActQ { format, planes: Default::default(), wide: Vec::new(), interleaved: Vec::new(), d: Vec::new(), sum: Vec::new() }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.d.len() * BLOCK
    }

    /// Whether no values are held.
    pub fn is_empty(&self) -> bool {
        self.d.is_empty()
    }

    /// Quantize `x` (its length must be a multiple of 32) into this buffer, in its format.
    pub fn quantize(&mut self, x: &[f32]) {
        assert_eq!(x.len() % BLOCK, 0, "ActQ::quantize: length {} is not a multiple of {BLOCK}", x.len());
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::isa() != crate::cpu::Isa::Scalar {
            self.resize(x.len());
            match self.format {
                Format::Planes if is_x86_feature_detected!("avx512f") => {
                    // SAFETY: AVX-512F detected; buffers sized by resize().
                    return unsafe { self.quantize_avx512(x) };
                }
                Format::Wide => {
                    // SAFETY: AVX2 and FMA detected by isa(); buffers sized by resize().
                    unsafe { self.quantize_wide_avx2(x) };
                    return self.interleave();
                }
                Format::Planes => {}
            }
        }
        self.quantize_reference(x)
    }

    fn resize(&mut self, k: usize) {
        let (planes, wide) = match self.format {
            Format::Planes => (k, 0),
            Format::Wide => (0, k),
        };
        for p in &mut self.planes {
            p.resize(planes, 0);
        }
        self.wide.resize(wide, 0);
        self.d.resize(k / BLOCK, 0.0);
        self.sum.resize(k / BLOCK, 0.0);
    }

    /// The same planes computed in f32, 16 lanes at a time. `x·(1/d)` carries a relative error of
    /// 2⁻²⁴ (under half a step of the finest plane); the residuals are then exact.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let (lim, neg) = (_mm512_set1_ps(127.0), _mm512_set1_ps(-127.0));
        let step = _mm512_set1_ps(STEP);
        let clamp_round = |v: __m512| _mm512_max_ps(_mm512_min_ps(_mm512_roundscale_ps::<NEAREST>(v), lim), neg);
        for b in 0..x.len() / BLOCK {
            let p = x.as_ptr().add(b * BLOCK);
            let (x0, x1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            self.d[b] = d;
            self.sum[b] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
            for (half, xv) in [x0, x1].into_iter().enumerate() {
                let u = _mm512_mul_ps(xv, id);
                let h = clamp_round(u);
                let r1 = _mm512_mul_ps(_mm512_sub_ps(u, h), step);
                let m = clamp_round(r1);
                let l = clamp_round(_mm512_mul_ps(_mm512_sub_ps(r1, m), step));
                let at = b * BLOCK + 16 * half;
                for (plane, v) in self.planes.iter_mut().zip([h, m, l]) {
                    _mm_storeu_si128(plane.as_mut_ptr().add(at) as *mut __m128i, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
                }
            }
        }
    }

    /// [`Format::Wide`] with AVX2: eight lanes at a time, the same f32 product and rounding as the
    /// scalar twin (so the values are equal; only the block sums may differ in their last bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_wide_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let fold = |v: __m256, f: unsafe fn(__m128, __m128) -> __m128| {
            let s = f(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = f(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(f(s, _mm_shuffle_ps(s, s, 1)))
        };
        for b in 0..x.len() / BLOCK {
            let p = x.as_ptr().add(b * BLOCK);
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let d = fold(m, |a, b| _mm_max_ps(a, b)) / WIDE_MAX;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            self.d[b] = d;
            self.sum[b] = fold(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])), |a, b| _mm_add_ps(a, b));
            // cvtps rounds to nearest even; packs keeps lanes per 128-bit half, so fix the order.
            let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
            let out = self.wide.as_mut_ptr().add(b * BLOCK) as *mut __m256i;
            _mm256_storeu_si256(out, _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(q[0], q[1])));
            _mm256_storeu_si256(out.add(1), _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(q[2], q[3])));
        }
    }

    /// Scalar twin of [`ActQ::quantize`] (planes in f64).
    pub fn quantize_reference(&mut self, x: &[f32]) {
        assert_eq!(x.len() % BLOCK, 0, "ActQ::quantize: length {} is not a multiple of {BLOCK}", x.len());
        self.resize(x.len());
        for (b, xs) in x.chunks_exact(BLOCK).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            self.sum[b] = xs.iter().sum();
            match self.format {
                Format::Planes => self.d[b] = self.planes_reference(b, xs, amax),
                Format::Wide => {
                    let d = amax / WIDE_MAX;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    self.d[b] = d;
                    for (q, &v) in self.wide[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(xs) {
                        *q = (v * id).round_ties_even().clamp(-WIDE_MAX, WIDE_MAX) as i16;
                    }
                }
            }
        }
        if self.format == Format::Wide {
            self.interleave();
        }
    }

    /// Whether the buffers hold what this CPU's kernels read: [`ActQ::quantize`] leaves them so;
    /// a vector assembled by hand may lack the interleaved copy.
    pub fn is_complete(&self) -> bool {
        let k = self.len();
        match self.format {
            Format::Planes => self.planes.iter().all(|p| p.len() == k),
            Format::Wide => {
                let group = crate::dot_actq::INTERLEAVE.len();
                self.wide.len() == k && (!crate::dot_actq::interleaved_kernel() || self.interleaved.len() * BLOCK == k.next_multiple_of(group))
            }
        }
    }

    /// Fill [`ActQ::interleaved`] from `wide` where the kernel that reads it runs.
    fn interleave(&mut self) {
        self.interleaved.clear();
        if !crate::dot_actq::interleaved_kernel() {
            return;
        }
        let order = &crate::dot_actq::INTERLEAVE;
        for src in self.wide.chunks(order.len()) {
            let value = |i: u8| src.get(i as usize).copied().unwrap_or(0);
            self.interleaved.extend(order.chunks_exact(BLOCK).map(|line| Line(std::array::from_fn(|j| value(line[j])))));
        }
    }

    /// Block `b`'s three planes; returns its scale.
    fn planes_reference(&mut self, b: usize, xs: &[f32], amax: f32) -> f32 {
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let [hi, mid, lo] = &mut self.planes;
        for (j, &v) in xs.iter().enumerate() {
            // Work in units of d, in f64 so the residuals are exact enough for three planes.
            let u = v as f64 * id as f64;
            let h = round(u).clamp(-127.0, 127.0);
            let r1 = (u - h) * STEP as f64;
            let m = round(r1).clamp(-127.0, 127.0);
            let l = round((r1 - m) * STEP as f64).clamp(-127.0, 127.0);
            hi[b * BLOCK + j] = h as i8;
            mid[b * BLOCK + j] = m as i8;
            lo[b * BLOCK + j] = l as i8;
        }
        d
    }

    /// The value this buffer represents at index `i` (for tests and reference twins).
    pub fn value(&self, i: usize) -> f32 {
        let d = self.d[i / BLOCK];
        match self.format {
            Format::Planes => {
                let [h, m, l] = &self.planes;
                d * (h[i] as f32 + m[i] as f32 / STEP + l[i] as f32 / (STEP * STEP))
            }
            Format::Wide => d * self.wide[i] as f32,
        }
    }

    /// Largest error [`ActQ::quantize`] may make on the value at `i` (half a step of the finest
    /// level, and the f32 rounding of `x / d`).
    pub fn error_bound(&self, i: usize, x: f32) -> f32 {
        let d = self.d[i / BLOCK];
        let half_step = match self.format {
            Format::Planes => d / (2.0 * STEP * STEP),
            Format::Wide => d / 2.0,
        };
        half_step * 1.01 + x.abs() * 2e-7
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn error_is_within_half_a_step_of_the_finest_level(x in proptest::collection::vec(-100f32..100.0, 1..5)) {
            let x: Vec<f32> = x.iter().cycle().take(64).enumerate().map(|(i, v)| v * (1.0 + i as f32 * 0.37).sin()).collect();
            for format in [Format::Planes, Format::Wide] {
                let mut q = ActQ::new(format);
                q.quantize(&x);
                for (i, &v) in x.iter().enumerate() {
                    prop_assert!((q.value(i) - v).abs() <= q.error_bound(i, v), "{format:?}: {} vs {} (d {})", q.value(i), v, q.d[i / BLOCK]);
                }
                // The fast path against its scalar twin: the same scales, and values that differ
                // by at most the sum of the two error bounds (triangle inequality; equal for Wide).
                let mut r = ActQ::new(format);
                r.quantize_reference(&x);
                prop_assert_eq!(&q.d, &r.d);
                prop_assert_eq!(&q.wide, &r.wide);
                prop_assert_eq!(&q.interleaved, &r.interleaved);
                for (b, xs) in x.chunks_exact(BLOCK).enumerate() {
                    let size: f32 = xs.iter().map(|v| v.abs()).sum();
                    prop_assert!((q.sum[b] - r.sum[b]).abs() <= 1e-6 * size, "{format:?}: block sums {} vs {}", q.sum[b], r.sum[b]);
                }
                for (i, &v) in x.iter().enumerate() {
                    prop_assert!((q.value(i) - r.value(i)).abs() <= 2.0 * r.error_bound(i, v), "{format:?}: {} vs {}", q.value(i), r.value(i));
                }
            }
        }
    }

    #[test]
    fn a_vector_missing_a_buffer_is_incomplete() {
        let x: Vec<f32> = (0..160).map(|i| (i as f32 * 0.37).sin()).collect();
        for format in [Format::Planes, Format::Wide] {
            let mut q = ActQ::new(format);
            q.quantize(&x);
            assert!(q.is_complete(), "{format:?}");
            q.wide.pop();
            q.planes[2].pop();
            assert!(!q.is_complete(), "{format:?}");
        }
        let mut q = ActQ::new(Format::Wide);
        q.quantize(&x);
        q.interleaved.clear();
        assert_eq!(q.is_complete(), !crate::dot_actq::interleaved_kernel());
    }

    #[test]
    fn zero_and_extreme_blocks() {
        let mut x = vec![0f32; 64];
        x[32] = -3.0e38;
        x[33] = 1.0e-30;
        for format in [Format::Planes, Format::Wide] {
            let mut q = ActQ::new(format);
            q.quantize(&x);
            assert_eq!(q.d[0], 0.0);
            assert!((0..32).all(|i| q.value(i) == 0.0), "{format:?}: an all-zero block stays zero");
            assert!((q.value(32) / -3.0e38 - 1.0).abs() < 1e-6, "{format:?}: {} for the block maximum", q.value(32));
        }
    }
}
