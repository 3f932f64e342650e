//! Per-row ops of a Llama layer, in place or into caller-owned buffers (no allocation).

use crate::dot::dot_f32;

/// `out = x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == w.len() && x.len() == out.len(), "rms_norm: length mismatch");
    let ms = dot_f32(x, x) / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * s * g;
    }
}

/// Softmax in place (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `g = silu(g) * u`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul: length mismatch");
    for (a, b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_assign: length mismatch");
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The cos/sin table of one position: `cs[i] = (cos(pos·f_i), sin(pos·f_i))`. The angle is formed
/// in f32 as HF transformers does, then its cos/sin taken in f64 and rounded.
pub fn rope_angles(pos: usize, inv_freq: &[f32], cs: &mut [(f32, f32)]) {
    for (c, &f) in cs.iter_mut().zip(inv_freq) {
        let a = (pos as f32 * f) as f64;
        *c = (a.cos() as f32, a.sin() as f32);
    }
}

/// Rotate each `head_dim` slice of `x` by `cs`. `interleaved`: pairs `(2i, 2i+1)` (GGUF weight
/// order, llama.cpp's "norm" RoPE); otherwise `(i, i + head_dim/2)` (HF "rotate half").
pub fn rope(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)], interleaved: bool) {
    let half = head_dim / 2;
    for h in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cs.iter().enumerate().take(half) {
            let (i0, i1) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (a, b) = (h[i0], h[i1]);
            h[i0] = a * c - b * s;
            h[i1] = b * c + a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rms_norm_matches_reference(x in proptest::collection::vec(-10f32..10.0, 1..300)) {
            let w: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let mut out = vec![0f32; x.len()];
            rms_norm(&x, &w, 1e-5, &mut out);
            let want = reference::rms_norm(&x, &w, 1e-5);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
            }
        }

        #[test]
        fn softmax_matches_reference(x in proptest::collection::vec(-50f32..50.0, 1..100)) {
            let mut y = x.clone();
            softmax(&mut y);
            for (a, b) in y.iter().zip(&reference::softmax(&x)) {
                prop_assert!((a - b).abs() <= 1e-6);
            }
        }

        #[test]
        fn rope_matches_reference(x in proptest::collection::vec(-2f32..2.0, 64), pos in 0usize..5000, inter: bool) {
            let inv: Vec<f32> = (0..32).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 64.0)).collect();
            let mut cs = vec![(0f32, 0f32); 32];
            rope_angles(pos, &inv, &mut cs);
            let mut y = x.clone();
            rope(&mut y, 64, &cs, inter);
            for (a, b) in y.iter().zip(&reference::rope(&x, pos, &inv, inter)) {
                prop_assert!((a - b).abs() <= 1e-5);
            }
        }

        #[test]
        fn silu_mul_matches_reference(g in proptest::collection::vec(-20f32..20.0, 1..64)) {
            let u: Vec<f32> = g.iter().map(|v| v * 0.3 - 1.0).collect();
            let mut y = g.clone();
            silu_mul(&mut y, &u);
            for (a, b) in y.iter().zip(&reference::silu_mul(&g, &u)) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
        }
    }
}
