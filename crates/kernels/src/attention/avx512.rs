//! The AVX-512 kernel of [`super::grouped_pass`]: several queries of one KV head over one
//! segment of positions, a tile at a time.

use super::KvElem;
use crate::vec::{EXP_MIN, EXP_TAYLOR, LN2_HI, LN2_LO};
use std::arch::x86_64::*;

/// `e^x` for 16 lanes: the same reduction and polynomial as [`crate::vec::exp`], with
/// `vscalefps` applying `2^n`; lanes below -87.3 (masked scores are -inf) give exactly 0.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp(x: __m512) -> __m512 {
    let xc = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_TAYLOR[0]);
    for k in &EXP_TAYLOR[1..] {
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(*k));
    }
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN));
    _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
}

/// Sums of each of sixteen vectors, as the sixteen lanes of one: a transposing addition tree
/// (pairs of vectors within 128-bit lanes, then across them), the same tree for every lane,
/// so a score does not depend on its slot. 30 shuffles and 15 additions where sixteen
/// horizontal reductions take 64 and 64.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sums16(a: &[__m512; 16]) -> __m512 {
    // [x0+x2, y0+y2, x1+x3, y1+y3] in each 128-bit lane.
    let pair = |x: __m512, y: __m512| _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    // [a, b, c, d] sums over each 128-bit lane.
    let quad = |ab: __m512, cd: __m512| {
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)))
    };
    // 128-bit lanes (0, 2) and (1, 3) of each input, added.
    let fold = |x: __m512, y: __m512| {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
    };
    let q: [__m512; 4] = std::array::from_fn(|i| quad(pair(a[4 * i], a[4 * i + 1]), pair(a[4 * i + 2], a[4 * i + 3])));
    fold(fold(q[0], q[1]), fold(q[2], q[3]))
}

/// Scores of positions `from..to` into `scores[from..to]`: sixteen at a time (sixteen
/// independent FMA chains, then one transposing addition tree); a partial last group repeats
/// position `to - 1` and drops its extra scores. A score does not depend on its slot, so
/// `0..n` cut into runs anywhere gives the scores of one run, bit for bit.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn score_run<const NV: usize>(q: &[__m512; NV], k: Kv<f32>, from: usize, to: usize, scale: f32, scores: *mut f32) {
    let scale = _mm512_set1_ps(scale);
    let mut i = from;
    while i < to {
        let acc: [__m512; 16] = std::array::from_fn(|j| {
            let kr = k.row((i + j).min(to - 1));
            let mut acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
            for (c, qc) in q.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(kr.add(16 * c)), acc);
            }
            acc
        });
        let keep: __mmask16 = if i + 16 <= to { 0xffff } else { ((1u32 << (to - i)) - 1) as u16 };
        _mm512_mask_storeu_ps(scores.add(i), keep, _mm512_mul_ps(sums16(&acc), scale));
        i += 16;
    }
}

/// Softmax numerators of `scores` in place, 16 at a time; returns their max and the sum of
/// the numerators.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_run(scores: &mut [f32]) -> (f32, f32) {
    let n = scores.len();
    let full = n / 16 * 16;
    let sp = scores.as_mut_ptr();
    let tail_mask: __mmask16 = ((1u32 << (n - full)) - 1) as u16;
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(sp.add(i)));
    }
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail_mask, sp.add(full)));
    let top = _mm512_reduce_max_ps(mx);
    let m = _mm512_set1_ps(top);
    let mut sum = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp(_mm512_sub_ps(_mm512_loadu_ps(sp.add(i)), m));
        _mm512_storeu_ps(sp.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if tail_mask != 0 {
        let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail_mask, sp.add(full)), m));
        let e = _mm512_maskz_mov_ps(tail_mask, e);
        _mm512_mask_storeu_ps(sp.add(full), tail_mask, e);
        sum = _mm512_add_ps(sum, e);
    }
    (top, _mm512_reduce_add_ps(sum))
}

/// Four sets of NV accumulators of the weighted sum of values (one set alone is a chain of
/// dependent FMAs, latency-bound).
type Acc<const NV: usize> = [[__m512; NV]; 4];

/// Adds `p_i · V[i]` for positions `from..to` (`from` a multiple of 4) to `o`, four
/// positions at a time, position `i` into set `i % 4`: runs cut at multiples of 4 add up
/// as one run.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn value_run<const NV: usize>(o: &mut Acc<NV>, scores: &[f32], v: Kv<f32>, from: usize, to: usize) {
    let mut i = from;
    while i < to {
        for (u, ou) in o.iter_mut().enumerate() {
            if i + u == to {
                break;
            }
            let (pv, vr) = (_mm512_set1_ps(scores[i + u]), v.row(i + u));
            for (c, oc) in ou.iter_mut().enumerate() {
                *oc = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vr.add(16 * c)), *oc);
            }
        }
        i += 4;
    }
}

/// `out = o[0] + o[1] + o[2] + o[3]`, in that order.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_sum<const NV: usize>(o: &Acc<NV>, out: *mut f32) {
    for (c, (((a, b), x), y)) in o[0].iter().zip(&o[1]).zip(&o[2]).zip(&o[3]).enumerate() {
        _mm512_storeu_ps(out.add(16 * c), _mm512_add_ps(_mm512_add_ps(*a, *b), _mm512_add_ps(*x, *y)));
    }
}

/// Rows of one KV head in a cache: position i (or the i-th listed one) at `base + stride · i`,
/// its scale (scaled types only) at `scales + n_kv_head · i`.
#[derive(Clone, Copy)]
struct Kv<'a, T> {
    base: *const T,
    stride: usize,
    scales: *const f32,
    n_kv_head: usize,
    positions: Option<&'a [u32]>,
}

impl<T> Kv<'_, T> {
    #[inline(always)]
    unsafe fn row(&self, i: usize) -> *const T {
        self.base.add(self.positions.map_or(i, |p| p[i] as usize) * self.stride)
    }

    #[inline(always)]
    unsafe fn scale(&self, i: usize) -> f32 {
        *self.scales.add(self.positions.map_or(i, |p| p[i] as usize) * self.n_kv_head)
    }
}

/// Most queries of one [`group_segment`] call.
pub(super) const GROUP_MAX: usize = 8;

/// Positions per tile of [`group_segment`]: the keys (or values) of a tile stay in L1 while every
/// query of the group takes its turn (a multiple of 4: see [`value_run`]).
const TILE: usize = 64;

/// Floats of the scratch [`group_segment`] widens 16-bit rows into: two tiles of heads of
/// up to 128.
pub(super) const WIDE: usize = 2 * TILE * 128;

/// Rows `from..to` of `rows`, times their scales, as f32 rows of `16 · NV` at `out`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn widen<T: KvElem, const NV: usize>(rows: Kv<T>, from: usize, to: usize, out: *mut f32) {
    for i in from..to {
        let (r, s) = (rows.row(i), _mm512_set1_ps(rows.scale(i)));
        for c in 0..NV {
            _mm512_storeu_ps(out.add((i - from) * 16 * NV + 16 * c), _mm512_mul_ps(T::load16(r.add(16 * c)), s));
        }
    }
}

/// One tile's rows for the f32 kernels: unscaled rows in place; 16-bit rows widened and
/// scaled into `wide` (`WIDE` floats): the first half holds positions `t0..` in order for
/// every query that sees them all (every query of a causal pass, and a tree's queries over
/// the cached prefix), converted once per tile (`*shared` says up to where); the second
/// half a query's own listed rows. A row widens to the same values either way, so a query's
/// arithmetic does not depend on the others in its call.
struct Tiles<'a, T> {
    wide: &'a mut [f32],
    shared: usize,
    base: (*const T, *const f32),
    stride: usize,
    n_kv_head: usize,
    t0: usize,
}

impl<T: KvElem> Tiles<'_, T> {
    /// Rows `t0..end` of query `g` (`end - t0 <= TILE`, `t0` the current tile's start, its
    /// shared rows up to `longest`), indexed from `t0` when widened, else from 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const NV: usize>(&mut self, g: &super::GroupQuery, end: usize, longest: usize) -> (Kv<'_, f32>, usize) {
        let (stride, n_kv_head, positions) = (self.stride, self.n_kv_head, positions(g));
        if !T::SCALED {
            debug_assert_eq!(std::mem::size_of::<T>(), 4);
            // f32, the only unscaled type: its rows as they are.
            return (Kv { base: self.base.0.cast::<f32>(), stride, scales: std::ptr::null(), n_kv_head, positions }, 0);
        }
        let rows = Kv { base: self.base.0, stride, scales: self.base.1, n_kv_head, positions };
        let (shared, own) = self.wide.split_at_mut(WIDE / 2);
        let flat = |p: *const f32| Kv { base: p, stride: 16 * NV, scales: std::ptr::null(), n_kv_head: 0, positions: None };
        // Listed positions rise from `list[i] >= i`, so `list[end - 1] == end - 1` means the
        // identity up to `end`.
        if g.pos.is_null() || *g.pos.add(end - 1) as usize == end - 1 {
            let upto = (self.t0 + TILE).min(longest);
            if self.shared != upto {
                widen::<T, NV>(Kv { positions: None, ..rows }, self.t0, upto, shared.as_mut_ptr());
                self.shared = upto;
            }
            (flat(shared.as_ptr()), self.t0)
        } else {
            widen::<T, NV>(rows, self.t0, end, own.as_mut_ptr());
            (flat(own.as_ptr()), self.t0)
        }
    }
}

/// Query g's positions (`None`: `0..g.n`).
unsafe fn positions<'a>(g: &super::GroupQuery) -> Option<&'a [u32]> {
    (!g.pos.is_null()).then(|| std::slice::from_raw_parts(g.pos, g.n))
}

/// Positions `seg` of several queries on one KV head (each seeing its own positions, `0..n`
/// or a list, and taking the part of `seg` below its `n`), with `head_dim = 16 · NV`: the
/// keys and then the values are visited a tile at a time for all the queries, where one
/// query at a time streams them from L2 for each. Writes each query's partial to `g.part`:
/// the segment's max score, the sum of its softmax numerators and their unnormalised
/// weighted sum of values. A query's arithmetic does not depend on the others in the call.
/// `scores` holds `seq` floats per query; `wide` is scratch of [`WIDE`] floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn group_segment<T: KvElem, const NV: usize>(
    qs: &[super::GroupQuery],
    k: (*const T, *const f32),
    v: (*const T, *const f32),
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    wide: &mut [f32],
    seq: usize,
    seg: std::ops::Range<usize>,
) {
    debug_assert!(qs.len() <= GROUP_MAX && scores.len() >= qs.len() * seq && seg.start.is_multiple_of(TILE) && wide.len() >= WIDE);
    let end = |g: &super::GroupQuery| seg.end.min(g.n);
    let longest = qs.iter().map(end).max().unwrap_or(0);
    let n_kv_head = stride / (16 * NV);
    let sp = scores.as_mut_ptr();
    let mut tiles = Tiles { wide, shared: usize::MAX, base: k, stride, n_kv_head, t0: 0 };
    for t0 in (seg.start..longest).step_by(TILE) {
        tiles.t0 = t0;
        for (j, g) in qs.iter().enumerate().filter(|(_, g)| t0 < end(g)) {
            let q: [__m512; NV] = std::array::from_fn(|c| _mm512_loadu_ps(g.q.add(16 * c)));
            let e = (t0 + TILE).min(end(g));
            let (rows, at) = tiles.rows::<NV>(g, e, longest);
            score_run(&q, rows, t0 - at, e - at, scale, sp.add(j * seq + at));
        }
    }
    let mut ml = [(0f32, 0f32); GROUP_MAX];
    for (j, g) in qs.iter().enumerate().filter(|(_, g)| seg.start < end(g)) {
        ml[j] = softmax_run(&mut scores[j * seq + seg.start..j * seq + end(g)]);
    }
    let mut o = [[[_mm512_setzero_ps(); NV]; 4]; GROUP_MAX];
    let mut tiles = Tiles { base: v, shared: usize::MAX, ..tiles };
    for t0 in (seg.start..longest).step_by(TILE) {
        tiles.t0 = t0;
        for (j, g) in qs.iter().enumerate().filter(|(_, g)| t0 < end(g)) {
            let e = (t0 + TILE).min(end(g));
            let (rows, at) = tiles.rows::<NV>(g, e, longest);
            value_run(&mut o[j], &scores[j * seq + at..j * seq + end(g)], rows, t0 - at, e - at);
        }
    }
    for (j, g) in qs.iter().enumerate().filter(|(_, g)| seg.start < end(g)) {
        (*g.part, *g.part.add(1)) = ml[j];
        store_sum(&o[j], g.part.add(2));
    }
}
