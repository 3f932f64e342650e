//! Attention of a batch of new query tokens against a KV cache, with grouped-query heads.
//!
//! Layouts: `q` and `out` are `[n_tok, n_head, head_dim]`; the caches are `[seq, n_kv_head, head_dim]`
//! (append-friendly: a new position is one contiguous write). Query head `h` reads KV head
//! `h / (n_head / n_kv_head)`.

use std::cell::RefCell;


use crate::pool;
use crate::real::hsum16;
use crate::vec::softmax;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention: each serves `n_head / n_kv_head` query heads).
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Which cached positions each new token may see.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// Token `t` of the batch sits at position `pos0 + t` and sees positions `0..=pos0 + t`.
    /// Query row `i` sees keys `0..=pos0 + i`.
    Causal {
        /// Position of the first query row.
        pos0: usize,
    },
    /// Row-major `[n_tok, seq]` booleans.
    Explicit(&'a [bool]),
}

thread_local! {
    /// Per-thread scores and visible-position list, grown in large steps.
    static SCRATCH: RefCell<(Vec<f32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `out[t, h] = softmax(q[t,h] · K[:, kvh]ᵀ · scale + mask) · V[:, kvh]` over `seq` cached positions.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seq: usize,
    shape: Shape,
    mask: Mask,
    scale: f32,
    out: &mut [f32],
) {
    let Shape { n_head, n_kv_head, head_dim } = shape;
    let kv_stride = n_kv_head * head_dim;
    assert!(n_kv_head > 0 && n_head % n_kv_head == 0, "attention: n_head must be a multiple of n_kv_head");
    assert!(k_cache.len() >= seq * kv_stride && v_cache.len() >= seq * kv_stride, "attention: cache too short");
    assert_eq!(out.len(), q.len(), "attention: out/q length mismatch");
    if let Mask::Explicit(m) = mask {
        assert_eq!(m.len(), q.len() / (n_head * head_dim) * seq, "attention: mask must be [n_tok, seq]");
    }
    let group = n_head / n_kv_head;
    #[cfg(target_arch = "x86_64")]
    if grouped(head_dim) {
        grouped_pass(q, k_cache, v_cache, seq, shape, mask, scale, out);
        return;
    }
    let op = pool::SyncPtr::new(out.as_mut_ptr());
    let items = out.len() / head_dim;
    pool::global().for_chunks(items, 1, &|range| {
        for i in range {
            let (t, h) = (i / n_head, i % n_head);
            let n_vis = match mask {
                Mask::Causal { pos0 } => (pos0 + t + 1).min(seq),
                Mask::Explicit(m) => m[t * seq..(t + 1) * seq].iter().filter(|&&v| v).count(),
            };
            let head = Head {
                q: &q[i * head_dim..(i + 1) * head_dim],
                k: k_cache,
                v: v_cache,
                offset: (h / group) * head_dim,
                stride: kv_stride,
                positions: None,
                scale,
            };
            // SAFETY: item i owns out[i*head_dim..(i+1)*head_dim]; items are disjoint.
            let o = unsafe { op.slice(i * head_dim, head_dim) };
            SCRATCH.with(|s| {
                let (scores, visible) = &mut *s.borrow_mut();
                if scores.len() < n_vis {
                    // Grow in large steps: no reallocation during decode below 4096 positions,
                    // and only at doublings beyond.
                    scores.resize(n_vis.max(4096).next_power_of_two(), 0.0);
                }
                match mask {
                    Mask::Causal { .. } => head.run(&mut scores[..n_vis], o),
                    Mask::Explicit(m) => {
                        // Attend over the visible positions only, in order: each one's rank is
                        // then the position it would have in a plain causal pass, so sums run in
                        // the same order and a tree pass reproduces plain decoding exactly.
                        if visible.capacity() < n_vis {
                            visible.reserve(n_vis.max(4096).next_power_of_two());
                        }
                        visible.clear();
                        visible.extend(m[t * seq..(t + 1) * seq].iter().enumerate().filter(|e| *e.1).map(|e| e.0 as u32));
                        Head { positions: Some(visible), ..head }.run(&mut scores[..n_vis], o)
                    }
                }
            });
        }
    });
}

/// Whether a pass takes [`grouped_pass`]: heads of 64 or 128 with AVX-512, whatever the number
/// of queries (one query alone takes it too, so that a query's arithmetic never depends on the
/// batch it came in).
#[cfg(target_arch = "x86_64")]
fn grouped(head_dim: usize) -> bool {
    use crate::cpu::{isa, Isa};
    matches!(head_dim, 64 | 128) && isa() != Isa::Scalar && is_x86_feature_detected!("avx512f")
}

/// One query of a grouped call: its vector, where its segment's partial goes (`[max, sum,
/// head_dim values]`), how many positions it sees and which (`pos` null: `0..n`, else `n` cached
/// positions in order).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct GroupQuery {
    q: *const f32,
    part: *mut f32,
    n: usize,
    pos: *const u32,
}

/// Positions per segment of [`grouped_pass`] (a multiple of the kernel's 64-position tiles).
#[cfg(target_arch = "x86_64")]
const SEG: usize = 128;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The caller's segment partials, visible-position lists and counts, grown in large steps.
    static PARTS: RefCell<(Vec<f32>, Vec<u32>, Vec<usize>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// A pass with the queries that share a KV head taken together, up to eight per work item
/// (ordered by token, so that an item's queries see about as many positions), and each query's
/// visible positions cut into segments of [`SEG`]: an item is (KV head, queries, segment), so a
/// head's keys and values are read once per item for all its queries, and a step of three KV
/// heads still spreads evenly over the threads once the cache is long. Each item leaves, per
/// query, its segment's max score, sum of exponentials and unnormalised weighted values; the
/// caller then merges every query's segments in order (`merge`). A query's arithmetic depends
/// on its own positions only, so it is the same bit for bit alone, in a batch or in a tree.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn grouped_pass(q: &[f32], k_cache: &[f32], v_cache: &[f32], seq: usize, shape: Shape, mask: Mask, scale: f32, out: &mut [f32]) {
    use avx512::GROUP_MAX;
    let Shape { n_head, n_kv_head, head_dim } = shape;
    let (group, kv_stride) = (n_head / n_kv_head, n_kv_head * head_dim);
    let n_tok = q.len() / (n_head * head_dim);
    let per_kv = n_tok * group;
    let chunks = per_kv.div_ceil(GROUP_MAX);
    let nseg = seq.div_ceil(SEG).max(1);
    let stride = head_dim + 2;
    PARTS.with(|p| {
        let (parts, lists, counts) = &mut *p.borrow_mut();
        // Sized for 4096 positions at least, then at doublings: no reallocation during decode.
        let room = seq.max(4096).next_power_of_two();
        if parts.len() < n_tok * n_head * nseg * stride {
            parts.resize(n_tok * n_head * room.div_ceil(SEG) * stride, 0.0);
        }
        if counts.len() < n_tok {
            counts.resize(n_tok.next_power_of_two(), 0);
        }
        for (t, n) in counts[..n_tok].iter_mut().enumerate() {
            *n = match mask {
                Mask::Causal { pos0 } => (pos0 + t + 1).min(seq),
                Mask::Explicit(m) => {
                    if lists.len() < n_tok * seq {
                        lists.resize(n_tok.next_power_of_two() * room, 0);
                    }
                    let list = &mut lists[t * seq..(t + 1) * seq];
                    let mut n = 0;
                    for (p, _) in m[t * seq..(t + 1) * seq].iter().enumerate().filter(|e| *e.1) {
                        list[n] = p as u32;
                        n += 1;
                    }
                    n
                }
            };
        }
        let (pp, counts, lists) = (pool::SyncPtr::new(parts.as_mut_ptr()), &counts[..n_tok], &lists[..]);
        pool::global().for_chunks(n_kv_head * chunks * nseg, 1, &|range| {
            for item in range {
                let (kvh, c, sg) = (item / (chunks * nseg), item / nseg % chunks, item % nseg);
                let qis = c * GROUP_MAX..((c + 1) * GROUP_MAX).min(per_kv);
                let mut qs = [GroupQuery { q: std::ptr::null(), part: std::ptr::null_mut(), n: 0, pos: std::ptr::null() }; GROUP_MAX];
                for (slot, qi) in qs.iter_mut().zip(qis.clone()) {
                    let (t, h) = (qi / group, kvh * group + qi % group);
                    let i = t * n_head + h;
                    let pos = if let Mask::Explicit(_) = mask { lists[t * seq..].as_ptr() } else { std::ptr::null() };
                    // SAFETY: segment sg of query i owns parts[(i·nseg + sg)·stride ..][..stride],
                    // inside `parts` (sized above); items are disjoint.
                    let part = unsafe { pp.ptr().add((i * nseg + sg) * stride) };
                    *slot = GroupQuery { q: q[i * head_dim..].as_ptr(), part, n: counts[t], pos };
                }
                let qs = &qs[..qis.len()];
                if qs.iter().all(|g| g.n <= sg * SEG) {
                    continue;
                }
                let (k, v) = (k_cache[kvh * head_dim..].as_ptr(), v_cache[kvh * head_dim..].as_ptr());
                SCRATCH.with(|s| {
                    let scores = &mut s.borrow_mut().0;
                    if scores.len() < GROUP_MAX * seq {
                        scores.resize((GROUP_MAX * seq).max(4096).next_power_of_two(), 0.0);
                    }
                    // SAFETY: AVX-512F detected (`grouped`); each query's vector holds head_dim =
                    // 16 · NV floats and its partial head_dim + 2, its positions are below `seq`,
                    // and the caches hold `seq` rows of kv_stride.
                    unsafe {
                        match head_dim {
                            64 => avx512::group_segment::<4>(qs, k, v, kv_stride, scale, scores, seq, sg * SEG..(sg + 1) * SEG),
                            _ => avx512::group_segment::<8>(qs, k, v, kv_stride, scale, scores, seq, sg * SEG..(sg + 1) * SEG),
                        }
                    }
                });
            }
        });
        // Each query merged alone, the same way whoever runs it: a prompt's thousands of
        // queries in parallel, a decode step's few on this thread.
        let parts = &parts[..];
        let op = pool::SyncPtr::new(out.as_mut_ptr());
        let merge_range = |range: std::ops::Range<usize>| {
            for i in range {
                let segs = counts[i / n_head].div_ceil(SEG);
                // SAFETY: query i owns out[i·head_dim ..][..head_dim]; ranges are disjoint.
                let o = unsafe { op.slice(i * head_dim, head_dim) };
                merge(&parts[i * nseg * stride..(i * nseg + segs) * stride], head_dim, o);
            }
        };
        let queries = n_tok * n_head;
        if queries > 64 {
            pool::global().for_chunks(queries, 64, &merge_range);
        } else {
            merge_range(0..queries);
        }
    });
}

/// A query's output from its segments' partials (`[max m, sum l, values o]` each, in order):
/// `Σ o_s e^(m_s - M) / Σ l_s e^(m_s - M)` with `M` the largest max.
#[cfg(target_arch = "x86_64")]
fn merge(parts: &[f32], head_dim: usize, out: &mut [f32]) {
    let segs = parts.chunks_exact(head_dim + 2);
    let top = segs.clone().map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
    out.fill(0.0);
    let mut tot = 0f32;
    for p in segs {
        let w = (p[0] - top).exp();
        tot += p[1] * w;
        for (o, v) in out.iter_mut().zip(&p[2..]) {
            *o += v * w;
        }
    }
    let inv = 1.0 / tot;
    for o in out {
        *o *= inv;
    }
}

/// One query head against its KV head.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// Offset of this KV head inside a cached position.
    offset: usize,
    /// Floats per cached position.
    stride: usize,
    /// The cached positions to attend to, in order (`None`: `0..scores.len()`).
    positions: Option<&'a [u32]>,
    scale: f32,
}

impl Head<'_> {
    fn run(&self, scores: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::{isa, Isa};
            if isa() >= Isa::Avx2 {
                // SAFETY: AVX2+FMA detected at run time; NV * 8 == head_dim.
                match self.q.len() {
                    32 => return unsafe { avx2::head::<4>(self, scores, out) },
                    64 => return unsafe { avx2::head::<8>(self, scores, out) },
                    // SAFETY: AVX2+FMA detected at run time.
                    _ => return unsafe { self.run_avx2(scores, out) },
                }
            }
        }
        self.body(scores, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, scores: &mut [f32], out: &mut [f32]) {
        self.body(scores, out)
    }

    /// Written so that, inlined into the `target_feature` wrappers above, its 16-lane loops
    /// compile to that ISA's vector FMAs.
    #[inline(always)]
    fn body(&self, scores: &mut [f32], out: &mut [f32]) {
        let d = self.q.len();
        let pos = |i: usize| self.positions.map_or(i, |p| p[i] as usize);
        for (i, sc) in scores.iter_mut().enumerate() {
            let k = &self.k[pos(i) * self.stride + self.offset..][..d];
            *sc = dot16(self.q, k) * self.scale;
        }
        softmax(scores);
        out.fill(0.0);
        for (i, &p) in scores.iter().enumerate() {
            if p == 0.0 {
                continue;
            }
            let v = &self.v[pos(i) * self.stride + self.offset..][..d];
            for (o, &x) in out.iter_mut().zip(v) {
                *o = p.mul_add(x, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Head;
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
    pub(super) unsafe fn head<const NV: usize>(h: &Head, scores: &mut [f32], out: &mut [f32]) {
        let q: [__m256; NV] = std::array::from_fn(|c| _mm256_loadu_ps(h.q.as_ptr().add(8 * c)));
        let (kp, vp) = (h.k.as_ptr().add(h.offset), h.v.as_ptr().add(h.offset));
        let n = scores.len();
        let pos = |i: usize| h.positions.map_or(i, |p| p[i] as usize);
        let scale = _mm256_set1_ps(h.scale);
        let mut i = 0;
        while i < n {
            // Past the end, repeat the last position and drop its scores.
            let acc: [__m256; 8] = std::array::from_fn(|j| {
                let k = kp.add(pos((i + j).min(n - 1)) * h.stride);
                let mut acc = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
                for (c, qc) in q.iter().enumerate().skip(1) {
                    acc = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(k.add(8 * c)), acc);
                }
                acc
            });
            let s = _mm256_mul_ps(sums8(&acc), scale);
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
            let (pv, v) = (_mm256_set1_ps(p * inv), vp.add(pos(i) * h.stride));
            for (c, oc) in o.iter_mut().enumerate() {
                *oc = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v.add(8 * c)), *oc);
            }
        }
        for (c, oc) in o.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), *oc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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
    unsafe fn score_run<const NV: usize>(q: &[__m512; NV], k: Kv, from: usize, to: usize, scale: f32, scores: *mut f32) {
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
    unsafe fn value_run<const NV: usize>(o: &mut Acc<NV>, scores: &[f32], v: Kv, from: usize, to: usize) {
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

    /// Rows of one KV head in a cache: position i (or the i-th listed one) at `base + stride · i`.
    #[derive(Clone, Copy)]
    struct Kv<'a> {
        base: *const f32,
        stride: usize,
        positions: Option<&'a [u32]>,
    }

    impl Kv<'_> {
        #[inline(always)]
        unsafe fn row(&self, i: usize) -> *const f32 {
            self.base.add(self.positions.map_or(i, |p| p[i] as usize) * self.stride)
        }
    }

    /// Most queries of one [`group_segment`] call.
    pub(super) const GROUP_MAX: usize = 8;

    /// Positions per tile of [`group_segment`]: the keys (or values) of a tile stay in L1 while every
    /// query of the group takes its turn (a multiple of 4: see [`value_run`]).
    const TILE: usize = 64;

    /// Positions `seg` of several queries on one KV head (each seeing its own positions, `0..n`
    /// or a list, and taking the part of `seg` below its `n`), with `head_dim = 16 · NV`: the
    /// keys and then the values are visited a tile at a time for all the queries, where one
    /// query at a time streams them from L2 for each. Writes each query's partial to `g.part`:
    /// the segment's max score, the sum of its softmax numerators and their unnormalised
    /// weighted sum of values. A query's arithmetic does not depend on the others in the call.
    /// `scores` holds `seq` floats per query.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn group_segment<const NV: usize>(
        qs: &[super::GroupQuery],
        k: *const f32,
        v: *const f32,
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        seq: usize,
        seg: std::ops::Range<usize>,
    ) {
        debug_assert!(qs.len() <= GROUP_MAX && scores.len() >= qs.len() * seq && seg.start.is_multiple_of(TILE));
        // Query g's rows of the keys (at `k`) or values (at `v`).
        let rows = |base: *const f32, g: &super::GroupQuery| Kv {
            base,
            stride,
            positions: (!g.pos.is_null()).then(|| std::slice::from_raw_parts(g.pos, g.n)),
        };
        let end = |g: &super::GroupQuery| seg.end.min(g.n);
        let longest = qs.iter().map(end).max().unwrap_or(0);
        let sp = scores.as_mut_ptr();
        for t0 in (seg.start..longest).step_by(TILE) {
            for (j, g) in qs.iter().enumerate().filter(|(_, g)| t0 < end(g)) {
                let q: [__m512; NV] = std::array::from_fn(|c| _mm512_loadu_ps(g.q.add(16 * c)));
                score_run(&q, rows(k, g), t0, (t0 + TILE).min(end(g)), scale, sp.add(j * seq));
            }
        }
        let mut ml = [(0f32, 0f32); GROUP_MAX];
        for (j, g) in qs.iter().enumerate().filter(|(_, g)| seg.start < end(g)) {
            ml[j] = softmax_run(&mut scores[j * seq + seg.start..j * seq + end(g)]);
        }
        let mut o = [[[_mm512_setzero_ps(); NV]; 4]; GROUP_MAX];
        for t0 in (seg.start..longest).step_by(TILE) {
            for (j, g) in qs.iter().enumerate().filter(|(_, g)| t0 < end(g)) {
                value_run(&mut o[j], &scores[j * seq..j * seq + end(g)], rows(v, g), t0, (t0 + TILE).min(end(g)));
            }
        }
        for (j, g) in qs.iter().enumerate().filter(|(_, g)| seg.start < end(g)) {
            (*g.part, *g.part.add(1)) = ml[j];
            store_sum(&o[j], g.part.add(2));
        }
    }
}

/// Dot product with 16 independent lanes (vectorizes without reassociation).
#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    hsum16(acc) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn matches_naive(seed in 1u64..10_000, seq in 1usize..300, n_tok_raw in 1usize..5, groups in 1usize..4, width in 0usize..3) {
            let n_tok = n_tok_raw.min(seq);
            // 8 takes the generic loop, 32 and 64 the AVX2 head kernels, 64 the AVX-512 one.
            let hd = [8, 32, 64][width];
            let shape = Shape { n_head: 2 * groups, n_kv_head: 2, head_dim: hd };
            let mut s = seed;
            let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) as f32 / 16777216.0) - 0.5 }).collect() };
            let q = rnd(n_tok * shape.n_head * hd);
            let kc = rnd(seq * 2 * hd);
            let vc = rnd(seq * 2 * hd);
            let pos0 = seq - n_tok;
            let mut out = vec![0f32; q.len()];
            attention(&q, &kc, &vc, seq, shape, Mask::Causal { pos0 }, 0.35, &mut out);
            // A tree-style explicit mask: every token sees position 0 and a pseudo-random subset.
            let explicit: Vec<bool> = (0..n_tok * seq).map(|i| i % seq == 0 || !((i as u64 * 2654435761) ^ seed).is_multiple_of(3)).collect();
            let mut out_m = vec![0f32; q.len()];
            attention(&q, &kc, &vc, seq, shape, Mask::Explicit(&explicit), 0.35, &mut out_m);
            for t in 0..n_tok {
                for h in 0..shape.n_head {
                    let kvh = h / groups;
                    let rows = |c: &[f32]| -> Vec<f32> { (0..seq).flat_map(|j| c[(j * 2 + kvh) * hd..(j * 2 + kvh + 1) * hd].to_vec()).collect() };
                    let (keys, vals) = (rows(&kc), rows(&vc));
                    let allowed: Vec<bool> = (0..seq).map(|j| j <= pos0 + t).collect();
                    let qi = (t * shape.n_head + h) * hd;
                    let want = reference::attention(&q[qi..qi + hd], &keys, &vals, 0.35, &allowed);
                    for (a, b) in out[qi..qi + hd].iter().zip(&want) {
                        prop_assert!((a - b).abs() < 1e-5);
                    }
                    let want = reference::attention(&q[qi..qi + hd], &keys, &vals, 0.35, &explicit[t * seq..(t + 1) * seq]);
                    for (a, b) in out_m[qi..qi + hd].iter().zip(&want) {
                        prop_assert!((a - b).abs() < 1e-5);
                    }
                }
            }
        }

        /// A pass of one or more tokens, causal or with a tree's mask (on AVX-512 with heads of
        /// 64 or 128 the queries of a KV head go together, in segments of 128 positions merged
        /// afterwards), gives each query exactly what it gets alone (the one-query path).
        #[test]
        fn batch_equals_one_query_at_a_time(seed in 1u64..10_000, seq in 20usize..220, n_tok in 1usize..13, groups in 1usize..4, wide in any::<bool>(), tree in any::<bool>()) {
            let hd = if wide { 128 } else { 64 };
            let shape = Shape { n_head: 2 * groups, n_kv_head: 2, head_dim: hd };
            let n_tok = n_tok.min(seq);
            let mut s = seed;
            let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) as f32 / 16777216.0) - 0.5 }).collect() };
            let (q, kc, vc) = (rnd(n_tok * shape.n_head * hd), rnd(seq * 2 * hd), rnd(seq * 2 * hd));
            let pos0 = seq - n_tok;
            // A tree's mask: the cached prefix, then a pseudo-random subset of the new positions.
            let rows: Vec<bool> = (0..n_tok * seq)
                .map(|i| {
                    let (t, j) = (i / seq, i % seq);
                    j < pos0 || j == pos0 + t || (tree && j < pos0 + t && !((i as u64 * 2654435761) ^ seed).is_multiple_of(3)) || (!tree && j <= pos0 + t)
                })
                .collect();
            let mask = if tree { Mask::Explicit(&rows) } else { Mask::Causal { pos0 } };
            let mut out = vec![0f32; q.len()];
            attention(&q, &kc, &vc, seq, shape, mask, 0.125, &mut out);
            // Each query alone: one head on a cache of its KV head only.
            let single = Shape { n_head: 1, n_kv_head: 1, head_dim: hd };
            for t in 0..n_tok {
                for h in 0..shape.n_head {
                    let kvh = h / groups;
                    let head_rows = |c: &[f32]| -> Vec<f32> { (0..seq).flat_map(|j| c[(j * 2 + kvh) * hd..(j * 2 + kvh + 1) * hd].to_vec()).collect() };
                    let qi = (t * shape.n_head + h) * hd;
                    let mut one = vec![0f32; hd];
                    attention(&q[qi..qi + hd], &head_rows(&kc), &head_rows(&vc), seq, single, Mask::Explicit(&rows[t * seq..(t + 1) * seq]), 0.125, &mut one);
                    prop_assert_eq!(out[qi..qi + hd].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), one.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
            }
        }
    }
}
