//! Attention of a batch of new query tokens against a KV cache, with grouped-query heads.
//!
//! Layouts: `q` and `out` are `[n_tok, n_head, head_dim]`; the caches are `[seq, n_kv_head, head_dim]`
//! (append-friendly: a new position is one contiguous write). Query head `h` reads KV head
//! `h / (n_head / n_kv_head)`. The caches hold f32, or i16 with a scale per row ([`Cache`]).

use std::cell::RefCell;


use crate::pool;
use crate::real::hsum16;
use crate::vec::softmax;

/// A layer's KV cache as the kernels read it: keys and values `[seq, n_kv_head, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub enum Cache<'a> {
    /// f32 values.
    F32 {
        /// Keys.
        k: &'a [f32],
        /// Values.
        v: &'a [f32],
    },
    /// 16-bit integers, each row of `head_dim` (one position, one KV head) times its own scale
    /// ([`quantize_row`]): half the bytes of f32 to stream per attended position, and within
    /// `max |row| / 65534` of each value. (f16 rows, tried first, took the reference test's
    /// max logit error on the 16-bit path from 9.1e-3 to 1.9e-2; these rows, to 1.1e-2.)
    I16 {
        /// Keys.
        k: &'a [i16],
        /// Values.
        v: &'a [i16],
        /// Key row scales, `[seq, n_kv_head]`.
        k_scales: &'a [f32],
        /// Value row scales, `[seq, n_kv_head]`.
        v_scales: &'a [f32],
    },
}

crate::multiversion! {
    /// `x` as 16-bit integers `out` and the scale that multiplies them back: `max |x| / 32767`
    /// (0 for a zero row; NaN, with zeros, for a row holding an infinity or NaN), each value
    /// rounded to the nearest step.
    pub fn quantize_row(x: &[f32], out: &mut [i16]) -> f32 {
        assert_eq!(x.len(), out.len(), "quantize_row: length mismatch");
        let top = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        if top == 0.0 || !top.is_finite() || x.iter().any(|v| v.is_nan()) {
            out.fill(0);
            return if top == 0.0 { 0.0 } else { f32::NAN };
        }
        let inv = 32767.0 / top;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v * inv).round_ties_even() as i16;
        }
        top / 32767.0
    }
}

/// An element type of a cache the kernels read: f32, or i16 with row scales.
trait KvElem: Copy + Send + Sync + 'static {
    /// Whether each row carries a scale (applied to a whole score, or to a value's weight).
    const SCALED: bool;
    /// The stored value as f32 (before its row's scale).
    fn to_f32(self) -> f32;
    /// Sixteen values from `p`, widened.
    ///
    /// # Safety
    /// AVX-512F is available and `p..p + 16` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Eight values from `p`, widened.
    ///
    /// # Safety
    /// AVX2 is available and `p..p + 8` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    const SCALED: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for i16 {
    const SCALED: bool = true;
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const i16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(p.cast::<__m256i>())))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const i16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(p.cast::<__m128i>())))
    }
}

/// Keys or values of one cache in one element type, with their row scales (empty unless
/// [`KvElem::SCALED`]).
#[derive(Clone, Copy)]
struct Src<'a, T> {
    vals: &'a [T],
    scales: &'a [f32],
}

impl<T: KvElem> Src<'_, T> {
    /// Where KV head `kvh`'s first row and first scale are (the scale pointer is null for an
    /// unscaled type).
    #[cfg(target_arch = "x86_64")]
    fn head(&self, kvh: usize, head_dim: usize) -> (*const T, *const f32) {
        (self.vals[kvh * head_dim..].as_ptr(), if T::SCALED { self.scales[kvh..].as_ptr() } else { std::ptr::null() })
    }

    /// Row `pos` of KV head `kvh` and its scale (1 for an unscaled type).
    fn row(&self, pos: usize, kvh: usize, n_kv_head: usize, head_dim: usize) -> (&[T], f32) {
        let r = pos * n_kv_head + kvh;
        (&self.vals[r * head_dim..(r + 1) * head_dim], if T::SCALED { self.scales[r] } else { 1.0 })
    }
}

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
pub fn attention(q: &[f32], cache: Cache, seq: usize, shape: Shape, mask: Mask, scale: f32, out: &mut [f32]) {
    let Shape { n_head, n_kv_head, head_dim } = shape;
    let kv_stride = n_kv_head * head_dim;
    assert!(n_kv_head > 0 && n_head % n_kv_head == 0, "attention: n_head must be a multiple of n_kv_head");
    let (rows, scales) = match cache {
        Cache::F32 { k, v } => (k.len().min(v.len()), seq * n_kv_head),
        Cache::I16 { k, v, k_scales, v_scales } => (k.len().min(v.len()), k_scales.len().min(v_scales.len())),
    };
    assert!(rows >= seq * kv_stride && scales >= seq * n_kv_head, "attention: cache too short");
    assert_eq!(out.len(), q.len(), "attention: out/q length mismatch");
    if let Mask::Explicit(m) = mask {
        assert_eq!(m.len(), q.len() / (n_head * head_dim) * seq, "attention: mask must be [n_tok, seq]");
    }
    match cache {
        Cache::F32 { k, v } => attend(q, Src { vals: k, scales: &[] }, Src { vals: v, scales: &[] }, seq, shape, mask, scale, out),
        Cache::I16 { k, v, k_scales, v_scales } => {
            attend(q, Src { vals: k, scales: k_scales }, Src { vals: v, scales: v_scales }, seq, shape, mask, scale, out)
        }
    }
}

/// [`attention`] on one element type.
#[allow(clippy::too_many_arguments)]
fn attend<T: KvElem>(q: &[f32], k_cache: Src<T>, v_cache: Src<T>, seq: usize, shape: Shape, mask: Mask, scale: f32, out: &mut [f32]) {
    let Shape { n_head, n_kv_head, head_dim } = shape;
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
                kvh: h / group,
                n_kv_head,
                head_dim,
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
fn grouped_pass<T: KvElem>(q: &[f32], k_cache: Src<T>, v_cache: Src<T>, seq: usize, shape: Shape, mask: Mask, scale: f32, out: &mut [f32]) {
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
                let (k, v) = (k_cache.head(kvh, head_dim), v_cache.head(kvh, head_dim));
                SCRATCH.with(|s| {
                    let scores = &mut s.borrow_mut().0;
                    let need = GROUP_MAX * seq + avx512::WIDE;
                    if scores.len() < need {
                        scores.resize(need.max(4096).next_power_of_two(), 0.0);
                    }
                    let (scores, wide) = scores.split_at_mut(GROUP_MAX * seq);
                    // SAFETY: AVX-512F detected (`grouped`); each query's vector holds head_dim =
                    // 16 · NV floats and its partial head_dim + 2, its positions are below `seq`,
                    // and the caches hold `seq` rows of kv_stride (and, if scaled, `seq` rows of
                    // n_kv_head scales: checked in `attention`).
                    unsafe {
                        match head_dim {
                            64 => avx512::group_segment::<T, 4>(qs, k, v, kv_stride, scale, scores, wide, seq, sg * SEG..(sg + 1) * SEG),
                            _ => avx512::group_segment::<T, 8>(qs, k, v, kv_stride, scale, scores, wide, seq, sg * SEG..(sg + 1) * SEG),
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
struct Head<'a, T> {
    q: &'a [f32],
    k: Src<'a, T>,
    v: Src<'a, T>,
    /// This query head's KV head.
    kvh: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// The cached positions to attend to, in order (`None`: `0..scores.len()`).
    positions: Option<&'a [u32]>,
    scale: f32,
}

impl<T: KvElem> Head<'_, T> {
    fn run(&self, scores: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::{isa, Isa};
            if isa() >= Isa::Avx2 {
                // SAFETY: AVX2+FMA detected at run time; NV * 8 == head_dim.
                match self.q.len() {
                    32 => return unsafe { avx2::head::<T, 4>(self, scores, out) },
                    64 => return unsafe { avx2::head::<T, 8>(self, scores, out) },
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
        let (kvh, n_kv, d) = (self.kvh, self.n_kv_head, self.head_dim);
        let pos = |i: usize| self.positions.map_or(i, |p| p[i] as usize);
        for (i, sc) in scores.iter_mut().enumerate() {
            let (k, ks) = self.k.row(pos(i), kvh, n_kv, d);
            *sc = dot16(self.q, k, T::to_f32) * ks * self.scale;
        }
        softmax(scores);
        out.fill(0.0);
        for (i, &p) in scores.iter().enumerate() {
            if p == 0.0 {
                continue;
            }
            let (v, vs) = self.v.row(pos(i), kvh, n_kv, d);
            let w = p * vs;
            for (o, &x) in out.iter_mut().zip(v) {
                *o = w.mul_add(x.to_f32(), *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Dot product with 16 independent lanes (vectorizes without reassociation).
#[inline(always)]
fn dot16<T: Copy>(a: &[f32], b: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, &y)| x * widen(y)).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(widen(y[i]), acc[i]);
        }
    }
    hsum16(acc) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    /// A cache in 16-bit rows of `hd` with their scales.
    struct Rows16 {
        q: Vec<i16>,
        scales: Vec<f32>,
    }

    impl Rows16 {
        fn of(x: &[f32], hd: usize) -> Self {
            let mut q = vec![0i16; x.len()];
            let scales = x.chunks_exact(hd).zip(q.chunks_exact_mut(hd)).map(|(r, o)| quantize_row(r, o)).collect();
            Rows16 { q, scales }
        }

        /// The values the rows stand for.
        fn values(&self, hd: usize) -> Vec<f32> {
            self.q.chunks_exact(hd).zip(&self.scales).flat_map(|(r, &s)| r.iter().map(move |&v| v as f32 * s)).collect()
        }

        /// The rows of KV head `kvh` of `n_kv`.
        fn head(&self, kvh: usize, n_kv: usize, hd: usize) -> Self {
            let rows = self.scales.len() / n_kv;
            Rows16 {
                q: (0..rows).flat_map(|j| self.q[(j * n_kv + kvh) * hd..(j * n_kv + kvh + 1) * hd].to_vec()).collect(),
                scales: (0..rows).map(|j| self.scales[j * n_kv + kvh]).collect(),
            }
        }

        fn cache<'a>(&'a self, v: &'a Rows16) -> Cache<'a> {
            Cache::I16 { k: &self.q, v: &v.q, k_scales: &self.scales, v_scales: &v.scales }
        }
    }

    #[test]
    fn quantized_rows_are_within_a_step_of_the_values() {
        let mut s = 7u64;
        for scale in [1e-3f32, 1.0, 300.0] {
            let x: Vec<f32> = (0..64).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); (((s >> 40) as f32 / 16777216.0) - 0.5) * scale }).collect();
            let mut q = vec![0i16; 64];
            let step = quantize_row(&x, &mut q);
            let top = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((step - top / 32767.0).abs() <= step * 1e-6);
            for (a, &b) in x.iter().zip(&q) {
                // Half a step, and the f32 roundings of scaling and widening.
                assert!((a - b as f32 * step).abs() <= step * 0.5 + 4.0 * f32::EPSILON * top, "{a} vs {b} x {step}");
            }
        }
        let mut q = [5i16; 4];
        assert_eq!(quantize_row(&[0.0; 4], &mut q), 0.0);
        assert_eq!(q, [0; 4]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn matches_naive(seed in 1u64..10_000, seq in 1usize..300, n_tok_raw in 1usize..5, groups in 1usize..4, width in 0usize..3, scaled in any::<bool>()) {
            let n_tok = n_tok_raw.min(seq);
            // 8 takes the generic loop, 32 and 64 the AVX2 head kernels, 64 the AVX-512 one.
            let hd = [8, 32, 64][width];
            let shape = Shape { n_head: 2 * groups, n_kv_head: 2, head_dim: hd };
            let mut s = seed;
            let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) as f32 / 16777216.0) - 0.5 }).collect() };
            let q = rnd(n_tok * shape.n_head * hd);
            let (kc, vc) = (rnd(seq * 2 * hd), rnd(seq * 2 * hd));
            // Scaled: the kernels read 16-bit rows; the reference gets their values back as f32.
            let (k16, v16) = (Rows16::of(&kc, hd), Rows16::of(&vc, hd));
            let (kc, vc) = if scaled { (k16.values(hd), v16.values(hd)) } else { (kc, vc) };
            let cache = if scaled { k16.cache(&v16) } else { Cache::F32 { k: &kc, v: &vc } };
            let pos0 = seq - n_tok;
            let mut out = vec![0f32; q.len()];
            attention(&q, cache, seq, shape, Mask::Causal { pos0 }, 0.35, &mut out);
            // A tree-style explicit mask: every token sees position 0 and a pseudo-random subset.
            let explicit: Vec<bool> = (0..n_tok * seq).map(|i| i % seq == 0 || !((i as u64 * 2654435761) ^ seed).is_multiple_of(3)).collect();
            let mut out_m = vec![0f32; q.len()];
            attention(&q, cache, seq, shape, Mask::Explicit(&explicit), 0.35, &mut out_m);
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
        fn batch_equals_one_query_at_a_time(seed in 1u64..10_000, seq in 20usize..220, n_tok in 1usize..13, groups in 1usize..4, wide in any::<bool>(), tree in any::<bool>(), scaled in any::<bool>()) {
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
            let (k16, v16) = (Rows16::of(&kc, hd), Rows16::of(&vc, hd));
            let mut out = vec![0f32; q.len()];
            attention(&q, if scaled { k16.cache(&v16) } else { Cache::F32 { k: &kc, v: &vc } }, seq, shape, mask, 0.125, &mut out);
            // Each query alone: one head on a cache of its KV head only.
            let single = Shape { n_head: 1, n_kv_head: 1, head_dim: hd };
            for t in 0..n_tok {
                for h in 0..shape.n_head {
                    let kvh = h / groups;
                    let head_rows = |c: &[f32]| -> Vec<f32> { (0..seq).flat_map(|j| c[(j * 2 + kvh) * hd..(j * 2 + kvh + 1) * hd].to_vec()).collect() };
                    let (k1, v1) = (head_rows(&kc), head_rows(&vc));
                    let (k1s, v1s) = (k16.head(kvh, 2, hd), v16.head(kvh, 2, hd));
                    let one_cache = if scaled { k1s.cache(&v1s) } else { Cache::F32 { k: &k1, v: &v1 } };
                    let qi = (t * shape.n_head + h) * hd;
                    let mut one = vec![0f32; hd];
                    attention(&q[qi..qi + hd], one_cache, seq, single, Mask::Explicit(&rows[t * seq..(t + 1) * seq]), 0.125, &mut one);
                    prop_assert_eq!(out[qi..qi + hd].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), one.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
            }
        }
    }
}
