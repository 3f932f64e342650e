//! Plain scalar twins of every fast kernel. Obviously correct, slow, and the oracle for the
//! property tests of the SIMD paths.

use crate::quant::QuantType;

/// `Σ x[i] * y[i]`, sequential f32 accumulation.
pub fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Dot product of a quantized row with an f32 vector, by dequantizing the whole row first.
pub fn dot_quant(ty: QuantType, row: &[u8], x: &[f32]) -> f32 {
    let mut w = vec![0f32; x.len()];
    ty.dequantize_row(row, &mut w);
    dot_f32(&w, x)
}

/// `y[t][r] = Σ_k x[t][k] * W[r][k]` for a dequantizer `row(r, &mut [f32])`.
pub fn matmul_rows(n_tok: usize, k: usize, rows: usize, x: &[f32], row: impl Fn(usize, &mut [f32])) -> Vec<f32> {
    let mut w = vec![0f32; k];
    let mut y = vec![0f32; n_tok * rows];
    for r in 0..rows {
        row(r, &mut w);
        for t in 0..n_tok {
            y[t * rows + r] = dot_f32(&x[t * k..(t + 1) * k], &w);
        }
    }
    y
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * s * g).collect()
}

/// Numerically stable softmax.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// `silu(g) * u`, with `silu(x) = x / (1 + e^-x)`.
pub fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter().zip(u).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect()
}

/// Rotate one head vector by the angles `pos * inv_freq[i]`. `interleaved` pairs `(2i, 2i+1)`
/// (GGUF/llama.cpp weight order); otherwise pairs `(i, i + d/2)` (HF "rotate half").
pub fn rope(x: &[f32], pos: usize, inv_freq: &[f32], interleaved: bool) -> Vec<f32> {
    let d = x.len();
    let mut y = x.to_vec();
    for (i, &f) in inv_freq.iter().enumerate() {
        let a = (pos as f32 * f) as f64;
        let (s, c) = (a.sin() as f32, a.cos() as f32);
        let (i0, i1) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + d / 2) };
        y[i0] = x[i0] * c - x[i1] * s;
        y[i1] = x[i1] * c + x[i0] * s;
    }
    y
}

/// Naive attention for one query head: `softmax(q·Kᵀ·scale + mask) · V` over `keys.len()/d` positions,
/// `allowed[j]` false masks position j out.
pub fn attention(q: &[f32], keys: &[f32], values: &[f32], scale: f32, allowed: &[bool]) -> Vec<f32> {
    let d = q.len();
    let scores: Vec<f32> = keys
        .chunks_exact(d)
        .zip(allowed)
        .map(|(k, &ok)| if ok { dot_f32(q, k) * scale } else { f32::NEG_INFINITY })
        .collect();
    let p = softmax(&scores);
    let mut out = vec![0f32; d];
    for (v, pj) in values.chunks_exact(d).zip(&p) {
        for (o, vv) in out.iter_mut().zip(v) {
            *o += pj * vv;
        }
    }
    out
}
