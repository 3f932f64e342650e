//! Attention of a batch of new query tokens against a KV cache, with grouped-query heads.
//!
//! Layouts: `q` and `out` are `[n_tok, n_head, head_dim]`; the caches are `[seq, n_kv_head, head_dim]`
//! (append-friendly: a new position is one contiguous write). Query head `h` reads KV head
//! `h / (n_head / n_kv_head)`.

use std::cell::RefCell;


use crate::dot::dot_f32;
use crate::pool;
use crate::vec::softmax;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Which cached positions each new token may see.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// Token `t` of the batch sits at position `pos0 + t` and sees positions `0..=pos0 + t`.
    Causal { pos0: usize },
    /// Row-major `[n_tok, seq]` booleans.
    Explicit(&'a [bool]),
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
    let group = n_head / n_kv_head;
    let op = pool::SyncPtr::new(out.as_mut_ptr());
    let items = out.len() / head_dim;
    pool::global().for_chunks(items, 1, &|range| for i in range {
        // SAFETY: item i owns out[i*head_dim..(i+1)*head_dim]; items are disjoint.
        let o = unsafe { op.slice(i * head_dim, head_dim) };
        let (t, h) = (i / n_head, i % n_head);
        let kvh = h / group;
        let qh = &q[i * head_dim..(i + 1) * head_dim];
        let visible = |j: usize| match mask {
            Mask::Causal { pos0 } => j <= pos0 + t,
            Mask::Explicit(m) => m[t * seq + j],
        };
        let n_vis = match mask {
            Mask::Causal { pos0 } => (pos0 + t + 1).min(seq),
            Mask::Explicit(_) => seq,
        };
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < n_vis {
                s.resize(n_vis, 0.0);
            }
            let sc = &mut s[..n_vis];
            for (j, v) in sc.iter_mut().enumerate() {
                let off = j * kv_stride + kvh * head_dim;
                *v = if visible(j) { dot_f32(qh, &k_cache[off..off + head_dim]) * scale } else { f32::NEG_INFINITY };
            }
            softmax(sc);
            o.fill(0.0);
            for (j, &p) in sc.iter().enumerate() {
                if p == 0.0 {
                    continue;
                }
                let off = j * kv_stride + kvh * head_dim;
                for (a, b) in o.iter_mut().zip(&v_cache[off..off + head_dim]) {
                    *a += p * b;
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn matches_naive(seed in 1u64..10_000, seq in 1usize..40, n_tok_raw in 1usize..5, groups in 1usize..4) {
            let n_tok = n_tok_raw.min(seq);
            let shape = Shape { n_head: 2 * groups, n_kv_head: 2, head_dim: 8 };
            let mut s = seed;
            let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) as f32 / 16777216.0) - 0.5 }).collect() };
            let q = rnd(n_tok * shape.n_head * 8);
            let kc = rnd(seq * 2 * 8);
            let vc = rnd(seq * 2 * 8);
            let pos0 = seq - n_tok;
            let mut out = vec![0f32; q.len()];
            attention(&q, &kc, &vc, seq, shape, Mask::Causal { pos0 }, 0.35, &mut out);
            for t in 0..n_tok {
                for h in 0..shape.n_head {
                    let kvh = h / groups;
                    let keys: Vec<f32> = (0..seq).flat_map(|j| kc[(j * 2 + kvh) * 8..(j * 2 + kvh + 1) * 8].to_vec()).collect();
                    let vals: Vec<f32> = (0..seq).flat_map(|j| vc[(j * 2 + kvh) * 8..(j * 2 + kvh + 1) * 8].to_vec()).collect();
                    let allowed: Vec<bool> = (0..seq).map(|j| j <= pos0 + t).collect();
                    let qi = (t * shape.n_head + h) * 8;
                    let want = reference::attention(&q[qi..qi + 8], &keys, &vals, 0.35, &allowed);
                    for (a, b) in out[qi..qi + 8].iter().zip(&want) {
                        prop_assert!((a - b).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
