//! The AVX2 kernel of one query head against its KV head (heads of 32 and 64).

use super::{Head, KvElem};
use crate::vec::{hsum_m256, EXP_MIN, EXP_TAYLOR, LN2_HI, LN2_LO};
use std::arch::x86_64::*;

/// `e^x` for 8 lanes with `x <= 0` (scores minus their maximum): the reduction and
/// polynomial of [`crate::vec::exp`], `2^n` built in the exponent field (n >= -126 after the
/// clamp); lanes below -87.3 (masked scores are -inf) give exactly 0.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp(x: __m256) -> __m256 {
    let xc = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
    for k in &EXP_TAYLOR[1..] {
        p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(*k));
    }
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_MIN));
    _mm256_and_ps(keep, _mm256_mul_ps(p, two_n))
}

/// Sums of each of eight vectors, as the eight lanes of one (the same addition tree for
/// every lane, so a score does not depend on its slot).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sums8(a: &[__m256; 8]) -> __m256 {
    let h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    let h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(h0, h1), _mm256_permute2f128_ps::<0x31>(h0, h1))
}

/// One head with `head_dim = 8 · NV` (NV <= 8): scores eight positions at a time (eight
/// independent FMA chains, then one addition tree), softmax over eight lanes at a time, and
/// the weighted sum of values kept in NV registers.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn head<T: KvElem, const NV: usize>(h: &Head<T>, scores: &mut [f32], out: &mut [f32]) {
    let q: [__m256; NV] = std::array::from_fn(|c| _mm256_loadu_ps(h.q.as_ptr().add(8 * c)));
    let ((kp, ksp), (vp, vsp)) = (h.k.head(h.kvh, h.head_dim), h.v.head(h.kvh, h.head_dim));
    let stride = h.n_kv_head * h.head_dim;
    // Row i's scale (1 for an unscaled type).
    let row_scale = |sp: *const f32, i: usize| if T::SCALED { *sp.add(i * h.n_kv_head) } else { 1.0 };
    let n = scores.len();
    let pos = |i: usize| h.positions.map_or(i, |p| p[i] as usize);
    let scale = _mm256_set1_ps(h.scale);
    let mut i = 0;
    while i < n {
        // Past the end, repeat the last position and drop its scores.
        let acc: [__m256; 8] = std::array::from_fn(|j| {
            let k = kp.add(pos((i + j).min(n - 1)) * stride);
            let mut acc = _mm256_mul_ps(q[0], T::load8(k));
            for (c, qc) in q.iter().enumerate().skip(1) {
                acc = _mm256_fmadd_ps(*qc, T::load8(k.add(8 * c)), acc);
            }
            acc
        });
        let mut s = sums8(&acc);
        if T::SCALED {
            let ks: [f32; 8] = std::array::from_fn(|j| row_scale(ksp, pos((i + j).min(n - 1))));
            s = _mm256_mul_ps(s, _mm256_loadu_ps(ks.as_ptr()));
        }
        let s = _mm256_mul_ps(s, scale);
        if i + 8 <= n {
            _mm256_storeu_ps(scores.as_mut_ptr().add(i), s);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), s);
            scores[i..].copy_from_slice(&tmp[..n - i]);
        }
        i += 8;
    }
    // softmax
    let full = n / 8 * 8;
    let sp = scores.as_mut_ptr();
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(8) {
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(sp.add(i)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
    let m = scores[full..].iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
    let mv = _mm256_set1_ps(m);
    let mut sum = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(sp.add(i)), mv));
        _mm256_storeu_ps(sp.add(i), e);
        sum = _mm256_add_ps(sum, e);
    }
    if full < n {
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..n - full].copy_from_slice(&scores[full..]);
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mv));
        _mm256_storeu_ps(tail.as_mut_ptr(), e);
        scores[full..].copy_from_slice(&tail[..n - full]);
        sum = _mm256_add_ps(sum, e);
    }
    let inv = 1.0 / hsum_m256(sum);
    // weighted sum of values
    let mut o = [_mm256_setzero_ps(); NV];
    for (i, &p) in scores.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let (pv, v) = (_mm256_set1_ps(p * inv * row_scale(vsp, pos(i))), vp.add(pos(i) * stride));
        for (c, oc) in o.iter_mut().enumerate() {
            *oc = _mm256_fmadd_ps(pv, T::load8(v.add(8 * c)), *oc);
        }
    }
    for (c, oc) in o.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), *oc);
    }
}
