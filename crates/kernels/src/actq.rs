//! Activations quantized as three int8 planes, for integer (VNNI) dot products at f32-like
//! precision.
//!
//! Per 32-value block with scale `d = max|x| / 127`: `hi = round(x / d)`, then the residual is
//! quantized twice more at 254 times finer steps: `mid = round(r₁ · 254 / d)`,
//! `lo = round(r₂ · 254² / d)`, so `x ≈ d · (hi + mid/254 + lo/254²)` with an error of at most
//! `d / (2 · 254²)` (22 bits of the block's range; every plane stays within ±127 without clamping).
//! A dot with a weight block is then three exact i32 dot products combined in f32.
//!
//! Measured on the reference prompts (see BENCHMARKS.md): one plane (llama.cpp's 8-bit Q8
//! scheme) moved top-10 logits by up to 1.12 for only 10% more decode speed; two planes (15 bits)
//! by up to 7.5e-3, which misses the 5e-3 fidelity bound; three planes match the f32 path. Rejected: i16 activations with
//! `vpdpwssd` (weights widened to 16 bits in registers: more unpacking for 15 bits only).

/// Values per quantization block (equal to the weight block length of Q4_0/Q4_1/Q8_0).
pub const BLOCK: usize = 32;

/// Step ratio between planes.
pub const STEP: f32 = 254.0;

/// A quantized activation vector (length a multiple of [`BLOCK`]). Buffers are reused across calls.
#[derive(Debug, Clone, Default)]
pub struct ActQ {
    /// The three planes, `[3][k]`: hi, mid, lo.
    pub planes: [Vec<i8>; 3],
    /// Scale per block, `[k / 32]`.
    pub d: Vec<f32>,
    /// Exact f32 sum of each block's values, `[k / 32]` (for the `m` term of Q4_1).
    pub sum: Vec<f32>,
}

/// Round to nearest (ties to even) without a libm call, so the loop vectorizes.
#[inline(always)]
fn round(v: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    (v + MAGIC) - MAGIC
}

impl ActQ {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.planes[0].len()
    }

    /// Whether no values are held.
    pub fn is_empty(&self) -> bool {
        self.planes[0].is_empty()
    }

    /// Quantize `x` (its length must be a multiple of 32) into this buffer.
    pub fn quantize(&mut self, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::isa() != crate::cpu::Isa::Scalar && is_x86_feature_detected!("avx512f") {
            assert_eq!(x.len() % BLOCK, 0, "ActQ::quantize: length {} is not a multiple of {BLOCK}", x.len());
            self.resize(x.len());
            // SAFETY: AVX-512F detected; buffers sized by resize().
            unsafe { self.quantize_avx512(x) };
            return;
        }
        self.quantize_reference(x)
    }

    fn resize(&mut self, k: usize) {
        for p in &mut self.planes {
            p.resize(k, 0);
        }
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

    /// Scalar twin of [`ActQ::quantize`], in f64.
    pub fn quantize_reference(&mut self, x: &[f32]) {
        assert_eq!(x.len() % BLOCK, 0, "ActQ::quantize: length {} is not a multiple of {BLOCK}", x.len());
        let nb = x.len() / BLOCK;
        self.resize(x.len());
        let [hi, mid, lo] = &mut self.planes;
        for b in 0..nb {
            let xs = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            self.d[b] = d;
            self.sum[b] = xs.iter().sum();
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
        }
    }

    /// The value this buffer represents at index `i` (for tests and reference twins).
    pub fn value(&self, i: usize) -> f32 {
        let [h, m, l] = &self.planes;
        self.d[i / BLOCK] * (h[i] as f32 + m[i] as f32 / STEP + l[i] as f32 / (STEP * STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn error_is_within_half_a_step_of_the_finest_plane(x in proptest::collection::vec(-100f32..100.0, 1..5)) {
            let x: Vec<f32> = x.iter().cycle().take(64).enumerate().map(|(i, v)| v * (1.0 + i as f32 * 0.37).sin()).collect();
            let mut q = ActQ::default();
            q.quantize(&x);
            for (i, &v) in x.iter().enumerate() {
                let d = q.d[i / BLOCK];
                let bound = d / (2.0 * STEP * STEP) * 1.01 + v.abs() * 2e-7;
                prop_assert!((q.value(i) - v).abs() <= bound, "{} vs {} (d {})", q.value(i), v, d);
            }
            // The fast path against its f64 twin: the same scales, and values that differ by at
            // most the sum of the two error bounds above (triangle inequality).
            let mut r = ActQ::default();
            r.quantize_reference(&x);
            for (i, &v) in x.iter().enumerate() {
                let d = r.d[i / BLOCK];
                prop_assert_eq!(q.d[i / BLOCK], d);
                let twin_bound = 2.0 * (d / (2.0 * STEP * STEP) * 1.01 + v.abs() * 2e-7);
                prop_assert!((q.value(i) - r.value(i)).abs() <= twin_bound, "{} vs {} (d {})", q.value(i), r.value(i), d);
            }
        }
    }
}
