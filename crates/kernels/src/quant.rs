//! GGUF / ggml block quantization formats.
//!
//! A quantized row of `k` weights is `k / block_len` blocks laid end to end; each block holds its own
//! scale(s) and packed integers. Layouts follow ggml's `block_*` structs byte for byte (little
//! endian, f16 scales), so rows can be used straight from an mmapped GGUF file.
//!
//! | type | weights/block | bytes/block | value |
//! |------|---------------|-------------|-------|
//! | Q4_0 | 32  | 18  | `d * (q - 8)`, q in 0..16 |
//! | Q4_1 | 32  | 20  | `d * q + m` |
//! | Q5_0 | 32  | 22  | `d * (q - 16)`, q in 0..32 |
//! | Q5_1 | 32  | 24  | `d * q + m` |
//! | Q8_0 | 32  | 34  | `d * q`, q signed 8 bit |
//! | Q4_K | 256 | 144 | 8 sub-blocks of 32, 6-bit scales and mins: `d*sc*q - dmin*m` |
//! | Q5_K | 256 | 176 | as Q4_K with a fifth bit per weight |
//! | Q6_K | 256 | 210 | 16 sub-blocks of 16, 8-bit scales: `d * sc * (q - 32)` |

use half::f16;

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;

/// A GGUF block-quantized element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 4-bit, one f16 scale per 32 weights (`q - 8`).
    Q4_0,
    /// 4-bit, f16 scale and minimum per 32 weights.
    Q4_1,
    /// 5-bit, one f16 scale per 32 weights.
    Q5_0,
    /// 5-bit, f16 scale and minimum per 32 weights.
    Q5_1,
    /// 8-bit, one f16 scale per 32 weights.
    Q8_0,
    /// 4-bit K-quant: 256-weight super-blocks of 8 sub-blocks with 6-bit scales and minimums.
    Q4_K,
    /// 5-bit K-quant, laid out like Q4_K plus a high-bit plane.
    Q5_K,
    /// 6-bit K-quant: 16 sub-blocks with 8-bit scales.
    Q6_K,
}

impl QuantType {
    /// Every supported block type.
    pub const ALL: [QuantType; 8] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    /// Number of weights in one block.
    pub const fn block_len(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => QK_K,
            _ => 32,
        }
    }

    /// Bytes in one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// The ggml type id used in GGUF tensor infos.
    pub const fn ggml_id(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
        }
    }

    /// The type with ggml's numeric id `id`.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        QuantType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// The ggml name (`Q4_1`, …).
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// Bytes of a row of `k` weights, or `None` when `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        k.is_multiple_of(self.block_len()).then(|| k / self.block_len() * self.block_bytes())
    }

    /// Dequantize one row: `src` holds `dst.len() / block_len` blocks.
    ///
    /// Panics if the lengths disagree; callers validate shapes when a tensor is built.
    pub fn dequantize_row(self, src: &[u8], dst: &mut [f32]) {
        let (bl, bb) = (self.block_len(), self.block_bytes());
        assert_eq!(dst.len() % bl, 0, "{}: row length {} is not a multiple of {bl}", self.name(), dst.len());
        assert_eq!(src.len(), dst.len() / bl * bb, "{}: byte length mismatch", self.name());
        for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bl)) {
            self.dequantize_block(b, y);
        }
    }

    /// Dequantize a single block into `y` (`block_len` values).
    #[inline]
    pub fn dequantize_block(self, b: &[u8], y: &mut [f32]) {
        match self {
            QuantType::Q4_0 => dequant_q4_0(b, y),
            QuantType::Q4_1 => dequant_q4_1(b, y),
            QuantType::Q5_0 => dequant_q5_0(b, y),
            QuantType::Q5_1 => dequant_q5_1(b, y),
            QuantType::Q8_0 => dequant_q8_0(b, y),
            QuantType::Q4_K => dequant_q4_k(b, y),
            QuantType::Q5_K => dequant_q5_k(b, y),
            QuantType::Q6_K => dequant_q6_k(b, y),
        }
    }

    /// Quantize one row (round to nearest, per-block scales). `x.len()` must be a multiple of the
    /// block length. Used to build test models and by `augur` when it writes GGUF files.
    pub fn quantize_row(self, x: &[f32]) -> Vec<u8> {
        let bl = self.block_len();
        assert_eq!(x.len() % bl, 0, "{}: row length {} is not a multiple of {bl}", self.name(), x.len());
        let mut out = Vec::with_capacity(x.len() / bl * self.block_bytes());
        for xb in x.chunks_exact(bl) {
            match self {
                QuantType::Q4_0 => quant_q4_0(xb, &mut out),
                QuantType::Q4_1 => quant_q4_1(xb, &mut out),
                QuantType::Q5_0 => quant_q5_0(xb, &mut out),
                QuantType::Q5_1 => quant_q5_1(xb, &mut out),
                QuantType::Q8_0 => quant_q8_0(xb, &mut out),
                QuantType::Q4_K => quant_kx(xb, &mut out, false),
                QuantType::Q5_K => quant_kx(xb, &mut out, true),
                QuantType::Q6_K => quant_q6_k(xb, &mut out),
            }
        }
        out
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn fifth_bits(qh: u32, j: usize) -> (u8, u8) {
    ((((qh >> j) << 4) & 0x10) as u8, ((qh >> (j + 12)) & 0x10) as u8)
}

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        y[j] = (((qs[j] & 0xF) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        y[j] = ((qs[j] & 0xF) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in the 12 `scales` bytes of Q4_K/Q5_K.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, yy)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (s1, m1) = scale_min_k4(2 * chunk, scales);
        let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            yy[l] = d1 * (q[l] & 0xF) as f32 - m1;
            yy[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for (chunk, (q, yy)) in ql.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (s1, m1) = scale_min_k4(2 * chunk, scales);
        let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            yy[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            yy[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &ql_all[64 * n..];
        let qh = &qh_all[32 * n..];
        let sc = &sc_all[8 * n..];
        let yy = &mut y[128 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yy[l] = d * (sc[is] as i8 as f32) * q1 as f32;
            yy[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
            yy[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
            yy[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
        }
    }
}

// ---- quantizers (round to nearest; simple, valid, not ggml's search-based ones) ----

fn absmax_signed(x: &[f32]) -> f32 {
    // The value with the largest magnitude, keeping its sign (ggml's Q4_0/Q5_0 convention).
    x.iter().copied().fold(0.0f32, |a, v| if v.abs() > a.abs() { v } else { a })
}

fn quant_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let max = absmax_signed(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn quant_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

fn pack_q5(q: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for j in 0..16 {
        qh |= (((q[j] & 0x10) >> 4) as u32) << j;
        qh |= (((q[j + 16] & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        out.push((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
    }
}

fn quant_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let max = absmax_signed(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let mut q = [0u8; 32];
    for j in 0..32 {
        q[j] = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u8;
    }
    pack_q5(&q, out);
}

fn quant_q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let mut q = [0u8; 32];
    for j in 0..32 {
        q[j] = (((x[j] - min) * id + 0.5) as i32).clamp(0, 31) as u8;
    }
    pack_q5(&q, out);
}

fn quant_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    for &v in x {
        out.push((v * id).round().clamp(-127.0, 127.0) as i8 as u8);
    }
}

/// Q4_K (`five == false`) or Q5_K: per 32-weight sub-block an affine `scale * q - min` fit,
/// with scales and mins quantized to 6 bits against two f16 super-scales.
fn quant_kx(x: &[f32], out: &mut Vec<u8>, five: bool) {
    let qmax = if five { 31.0 } else { 15.0 };
    let mut sub_scale = [0f32; 8];
    let mut sub_min = [0f32; 8];
    for (i, xs) in x.chunks_exact(32).enumerate() {
        let (lo, hi) = min_max(xs);
        let lo = lo.min(0.0); // mins are stored as positive offsets subtracted from d*q
        sub_scale[i] = (hi - lo) / qmax;
        sub_min[i] = -lo;
    }
    let max_scale = sub_scale.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = sub_min.iter().fold(0f32, |a, &v| a.max(v));
    let d = max_scale / 63.0;
    let dmin = max_min / 63.0;
    let d = f16::from_f32(d).to_f32();
    let dmin = f16::from_f32(dmin).to_f32();
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for i in 0..8 {
        ls[i] = if d > 0.0 { (sub_scale[i] / d).round().clamp(0.0, 63.0) as u8 } else { 0 };
        lm[i] = if dmin > 0.0 { (sub_min[i] / dmin).round().clamp(0.0, 63.0) as u8 } else { 0 };
    }
    let mut scales = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            scales[j - 4] |= (ls[j] >> 4) << 6;
            scales[j] |= (lm[j] >> 4) << 6;
        }
    }
    let mut q = [0u8; QK_K];
    for (i, xs) in x.chunks_exact(32).enumerate() {
        let dl = d * ls[i] as f32;
        let ml = dmin * lm[i] as f32;
        for (l, &v) in xs.iter().enumerate() {
            q[32 * i + l] = if dl > 0.0 { ((v + ml) / dl).round().clamp(0.0, qmax) as u8 } else { 0 };
        }
    }
    push_f16(out, d);
    push_f16(out, dmin);
    out.extend_from_slice(&scales);
    if five {
        let mut qh = [0u8; 32];
        for (i, &qq) in q.iter().enumerate() {
            if qq > 15 {
                qh[i % 32] |= 1 << (i / 32);
            }
        }
        out.extend_from_slice(&qh);
    }
    for chunk in 0..4 {
        for l in 0..32 {
            let lo = q[64 * chunk + l] & 0xF;
            let hi = q[64 * chunk + 32 + l] & 0xF;
            out.push(lo | (hi << 4));
        }
    }
}

fn quant_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut sub = [0f32; 16];
    for (i, xs) in x.chunks_exact(16).enumerate() {
        sub[i] = absmax_signed(xs) / -32.0;
    }
    let max_abs = sub.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let d = f16::from_f32(max_abs.abs() / 127.0).to_f32();
    let mut sc = [0i8; 16];
    for i in 0..16 {
        sc[i] = if d > 0.0 { (sub[i] / d).round().clamp(-127.0, 127.0) as i8 } else { 0 };
    }
    let mut q = [0u8; QK_K];
    for (i, xs) in x.chunks_exact(16).enumerate() {
        let dl = d * sc[i] as f32;
        for (l, &v) in xs.iter().enumerate() {
            q[16 * i + l] = if dl != 0.0 { ((v / dl).round() + 32.0).clamp(0.0, 63.0) as u8 } else { 32 };
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for n in 0..2 {
        for l in 0..32 {
            let base = 128 * n;
            let (q1, q2, q3, q4) = (q[base + l], q[base + l + 32], q[base + l + 64], q[base + l + 96]);
            ql[64 * n + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[64 * n + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[32 * n + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    push_f16(out, d);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rmse(a: &[f32], b: &[f32]) -> f32 {
        (a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>() / a.len() as f32).sqrt()
    }

    #[test]
    fn block_sizes_match_ggml() {
        // sizeof(block_q4_K) = 2*2 + 12 + 128, etc.
        assert_eq!(QuantType::Q4_K.block_bytes(), 4 + 12 + QK_K / 2);
        assert_eq!(QuantType::Q5_K.block_bytes(), 4 + 12 + QK_K / 8 + QK_K / 2);
        assert_eq!(QuantType::Q6_K.block_bytes(), QK_K / 2 + QK_K / 4 + QK_K / 16 + 2);
        for t in QuantType::ALL {
            assert_eq!(QuantType::from_ggml_id(t.ggml_id()), Some(t));
        }
    }

    #[test]
    fn q4_1_known_block() {
        // d = 0.5, m = -1.0; low nibble j -> weight j, high nibble -> weight j + 16.
        let mut b = Vec::new();
        push_f16(&mut b, 0.5);
        push_f16(&mut b, -1.0);
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        QuantType::Q4_1.dequantize_row(&b, &mut y);
        assert_eq!(y[0], -1.0);
        assert_eq!(y[3], 0.5);
        assert_eq!(y[16], 6.5);
        assert_eq!(y[31], -1.0);
    }

    proptest! {
        #[test]
        fn quantize_roundtrip_error_is_bounded(seed in 0u64..1000, scale in 0.01f32..10.0) {
            let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let x: Vec<f32> = (0..512).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            }).collect();
            for t in QuantType::ALL {
                let q = t.quantize_row(&x);
                prop_assert_eq!(q.len(), t.row_bytes(x.len()).unwrap());
                let mut y = vec![0f32; x.len()];
                t.dequantize_row(&q, &mut y);
                // Uniform values in [-scale, scale]: step ~ 2*scale / levels, rmse ~ step / sqrt(12),
                // K-quants add 6-bit scale rounding. Bound each format loosely by its bit width.
                let bits = match t { QuantType::Q8_0 => 8.0, QuantType::Q6_K => 6.0,
                    QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q5_K => 5.0, _ => 4.0 };
                let bound = 2.0 * scale / (2f32.powf(bits) - 1.0) * 0.6;
                let e = rmse(&x, &y);
                prop_assert!(e <= bound, "{}: rmse {} > {}", t.name(), e, bound);
            }
        }
    }
}
