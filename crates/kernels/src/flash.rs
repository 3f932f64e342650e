//! FlashAttention on the CPU: the tiled, online-softmax forward pass and the FlashAttention-2
//! backward pass (Dao 2023), over `[batch, heads, len, dim]` row-major slices.
//!
//! Neither pass holds a `q_len × k_len` matrix: the forward keeps a running maximum, a running sum
//! and an output accumulator per query row while it walks the keys in tiles, and saves the row's
//! log-sum-exp; the backward recomputes each probability from that log-sum-exp. Memory beyond the
//! inputs and outputs is `O(dim)` per worker. The scalar reference in the tests materialises the
//! whole matrix and must agree.

use rayon::prelude::*;

use crate::multiversion;
use crate::real::{dot, hmax16, hsum16, Real};

/// Query rows and keys per tile: each tile's scores are one small matrix product.
const BR: usize = 64;
const BC: usize = 64;

/// `dst[m×n] (+)= beta · a[m×k] · b[k×n]`, each operand given by its row and column strides.
#[allow(clippy::too_many_arguments)]
#[inline]
fn mm<T: Real>((m, n, k): (usize, usize, usize), dst: &mut [T], dst_rs: usize, add: bool, a: &[T], (a_rs, a_cs): (usize, usize), b: &[T], (b_rs, b_cs): (usize, usize), beta: T) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the assertions above keep every index gemm forms inside the three slices.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, dst_rs as isize, add,
            a.as_ptr(), a_cs as isize, a_rs as isize,
            b.as_ptr(), b_cs as isize, b_rs as isize,
            T::ONE, beta, false, false, false, gemm::Parallelism::None,
        );
    }
}

/// The largest of `x` (`-inf` when empty), over 16 lanes so that it vectorizes.
#[inline(always)]
fn lane_max<T: Real>(x: &[T]) -> T {
    let mut m = [T::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            m[l] = m[l].max(c[l]);
        }
    }
    chunks.remainder().iter().fold(hmax16(m), |a, &b| a.max(b))
}

/// `x[c] = e^(x[c] - sub)` in place (`-inf` gives 0), and the sum of the results over 16 lanes.
#[inline(always)]
fn exp_sum<T: Real>(x: &mut [T], sub: T) -> T {
    let mut acc = [T::ZERO; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for l in 0..16 {
            c[l] = (c[l] - sub).fast_exp();
            acc[l] += c[l];
        }
    }
    let mut s = T::ZERO;
    for v in chunks.into_remainder() {
        *v = (*v - sub).fast_exp();
        s += *v;
    }
    hsum16(acc) + s
}

/// Sizes of one attention call. Query heads are grouped over key/value heads (GQA): query head
/// `h` reads key/value head `h / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Query rows per head.
    pub q_len: usize,
    /// Key rows per head.
    pub k_len: usize,
    /// Width of one head.
    pub dim: usize,
}

impl Shape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Is the shape usable: no empty dimension, heads divisible by kv heads, and for a causal
    /// mask at least as many keys as queries (queries are the last `q_len` positions of the keys).
    pub fn check(&self, causal: bool) -> Result<(), String> {
        if [self.batch, self.heads, self.q_len, self.k_len, self.dim].contains(&0) {
            return Err(format!("every size must be positive, got {self:?}"));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!("{} query heads cannot be grouped over {} key/value heads", self.heads, self.kv_heads));
        }
        if causal && self.q_len > self.k_len {
            return Err(format!("a causal mask needs at least as many keys ({}) as queries ({})", self.k_len, self.q_len));
        }
        Ok(())
    }
}

/// Which keys each query sees, and what is added to its scores.
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a, T> {
    /// Query `i` sees keys `0..=i + k_len - q_len`.
    pub causal: bool,
    /// `[q_len × k_len]`, `true` where the query may attend (a tree mask, padding, ...).
    pub allow: Option<&'a [bool]>,
    /// `[heads × q_len × k_len]` added to the scaled scores (T5 relative bias, a learned bias).
    pub bias: Option<&'a [T]>,
    /// One ALiBi slope per query head: `-slope × |query position − key position|` is added.
    pub alibi: Option<&'a [T]>,
}

impl<T: Real> Mask<'_, T> {
    /// Causal masking only (bottom-right aligned when `k_len > q_len`).
    pub fn causal() -> Self {
        Mask { causal: true, allow: None, bias: None, alibi: None }
    }

    #[inline]
    fn key_end(&self, s: &Shape, i: usize) -> usize {
        if self.causal {
            i + s.k_len - s.q_len + 1
        } else {
            s.k_len
        }
    }

    /// Only the causal limit (or nothing) masks: no per-score term to add or test.
    fn is_plain(&self) -> bool {
        self.allow.is_none() && self.bias.is_none() && self.alibi.is_none()
    }

    /// The scaled score's additive term for (head, query, key), or `None` when masked out.
    #[inline]
    fn term(&self, s: &Shape, h: usize, i: usize, j: usize) -> Option<T> {
        if let Some(a) = self.allow {
            if !a[i * s.k_len + j] {
                return None;
            }
        }
        let mut b = T::ZERO;
        if let Some(bias) = self.bias {
            b += bias[(h * s.q_len + i) * s.k_len + j];
        }
        if let Some(sl) = self.alibi {
            let qi = i + s.k_len - s.q_len;
            b -= sl[h] * T::from_f64(qi.abs_diff(j) as f64);
        }
        Some(b)
    }
}

/// `out = softmax(q·kᵀ·scale + mask) · v`, and the log-sum-exp of every query row (`-inf` for a
/// row that sees no key; its output is zero).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(s: &Shape, m: &Mask<T>, scale: T, q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T]) {
    let (d, g) = (s.dim, s.group());
    assert_eq!(q.len(), s.batch * s.heads * s.q_len * d);
    assert_eq!(k.len(), s.batch * s.kv_heads * s.k_len * d);
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), s.batch * s.heads * s.q_len);
    let work = out.par_chunks_mut(s.q_len * d).zip(lse.par_chunks_mut(s.q_len));
    work.enumerate().for_each(|(bh, (out, lse))| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let kv = (b * s.kv_heads + h / g) * s.k_len * d;
        let (k, v) = (&k[kv..kv + s.k_len * d], &v[kv..kv + s.k_len * d]);
        let q = &q[bh * s.q_len * d..(bh + 1) * s.q_len * d];
        forward_head(s, m, scale, h, q, k, v, out, lse);
    });
}

multiversion! {
    /// One query head of [`forward`]: `q`, `out` and `lse` its rows, `k` and `v` its key/value
    /// head's.
    #[allow(clippy::too_many_arguments)]
    fn forward_head[T: Real](s: &Shape, m: &Mask<T>, scale: T, h: usize, q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T]) {
        let (d, plain) = (s.dim, m.is_plain());
        let mut sc = vec![T::ZERO; BR * BC];
        let (mut mx, mut sum) = ([T::ZERO; BR], [T::ZERO; BR]);
        for i0 in (0..s.q_len).step_by(BR) {
            let br = BR.min(s.q_len - i0);
            let acc = &mut out[i0 * d..(i0 + br) * d];
            acc.fill(T::ZERO);
            mx[..br].fill(T::NEG_INFINITY);
            sum[..br].fill(T::ZERO);
            let end = m.key_end(s, i0 + br - 1);
            for j0 in (0..end).step_by(BC) {
                let bc = BC.min(end - j0);
                // Scores of the tile: q rows i0.. against k rows j0.. (kᵀ read in place).
                mm((br, bc, d), &mut sc, BC, false, &q[i0 * d..], (d, 1), &k[j0 * d..], (1, d), scale);
                for r in 0..br {
                    let i = i0 + r;
                    let row = &mut sc[r * BC..r * BC + bc];
                    let lim = m.key_end(s, i);
                    // Keys j0 + valid.. are masked: by the causal limit alone on a plain mask,
                    // else as -inf scores written here.
                    let valid = if plain { lim.saturating_sub(j0).min(bc) } else { bc };
                    if !plain {
                        for (c, x) in row.iter_mut().enumerate() {
                            let j = j0 + c;
                            *x = match (j < lim).then(|| m.term(s, h, i, j)).flatten() {
                                Some(t) => *x + t,
                                None => T::NEG_INFINITY,
                            };
                        }
                    }
                    let tile_max = lane_max(&row[..valid]);
                    if tile_max == T::NEG_INFINITY {
                        row.fill(T::ZERO);
                        continue;
                    }
                    let new_max = mx[r].max(tile_max);
                    if mx[r] != T::NEG_INFINITY && new_max != mx[r] {
                        let c = (mx[r] - new_max).fast_exp();
                        sum[r] *= c;
                        acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= c);
                    }
                    mx[r] = new_max;
                    sum[r] += exp_sum(&mut row[..valid], new_max);
                    row[valid..].fill(T::ZERO);
                }
                // acc += P · v rows j0..
                mm((br, d, bc), acc, d, true, &sc, (BC, 1), &v[j0 * d..], (d, 1), T::ONE);
            }
            for r in 0..br {
                if sum[r] == T::ZERO {
                    lse[i0 + r] = T::NEG_INFINITY;
                    acc[r * d..(r + 1) * d].fill(T::ZERO);
                } else {
                    let inv = T::ONE / sum[r];
                    acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= inv);
                    lse[i0 + r] = mx[r] + sum[r].ln();
                }
            }
        }
    }
}

/// Gradients of [`forward`]'s output. `dbias`, when given, receives the bias gradient summed over
/// the batch (`[heads × q_len × k_len]`). Probabilities are recomputed from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    s: &Shape,
    m: &Mask<T>,
    scale: T,
    (q, k, v): (&[T], &[T], &[T]),
    (out, lse, dout): (&[T], &[T], &[T]),
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    dbias: Option<&mut [T]>,
) {
    let (d, g) = (s.dim, s.group());
    let rows = s.q_len * d;
    let keys = s.k_len * d;
    let plane = s.q_len * s.k_len;
    // One task per (batch, kv head): it owns that head's dk/dv and its query heads' dq.
    let mut partial = dbias.as_ref().map(|_| vec![T::ZERO; s.batch * s.heads * plane]);
    let mut tasks: Vec<_> = dq.chunks_mut(g * rows).zip(dk.chunks_mut(keys)).zip(dv.chunks_mut(keys)).collect();
    let mut biases: Vec<Option<&mut [T]>> = match partial.as_mut() {
        Some(p) => p.chunks_mut(g * plane).map(Some).collect(),
        None => (0..tasks.len()).map(|_| None).collect(),
    };
    let work: Vec<_> = tasks.drain(..).zip(biases.drain(..)).enumerate().collect();
    work.into_par_iter().for_each(|(bg, (((dq, dk), dv), db))| backward_group(s, m, scale, bg, (q, k, v), (out, lse, dout), (dq, dk, dv), db));
    if let (Some(dbias), Some(p)) = (dbias, partial) {
        dbias.fill(T::ZERO);
        for chunk in p.chunks(s.heads * plane) {
            dbias.iter_mut().zip(chunk).for_each(|(a, &b)| *a += b);
        }
    }
}

multiversion! {
    /// Task `bg` of [`backward`], one key/value head: its dk and dv, and the dq (and bias
    /// gradient rows) of the query heads grouped on it.
    #[allow(clippy::too_many_arguments)]
    fn backward_group[T: Real](s: &Shape, m: &Mask<T>, scale: T, bg: usize, qkv: (&[T], &[T], &[T]), fwd: (&[T], &[T], &[T]), grads: (&mut [T], &mut [T], &mut [T]), db: Option<&mut [T]>) {
        let ((q, k, v), (out, lse, dout), (dq, dk, dv), mut db) = (qkv, fwd, grads, db);
        let (d, g, plain) = (s.dim, s.group(), m.is_plain());
        let (rows, keys) = (s.q_len * d, s.k_len * d);
        dq.fill(T::ZERO);
        dk.fill(T::ZERO);
        dv.fill(T::ZERO);
        let (k, v) = (&k[bg * keys..(bg + 1) * keys], &v[bg * keys..(bg + 1) * keys]);
        let b = bg / s.kv_heads;
        let (mut p, mut dp) = (vec![T::ZERO; BR * BC], vec![T::ZERO; BR * BC]);
        let mut delta = vec![T::ZERO; s.q_len];
        for r in 0..g {
            let h = (bg % s.kv_heads) * g + r;
            let base = (b * s.heads + h) * s.q_len;
            let (q, o, dout) = (&q[base * d..(base + s.q_len) * d], &out[base * d..(base + s.q_len) * d], &dout[base * d..(base + s.q_len) * d]);
            let lse = &lse[base..base + s.q_len];
            let dq = &mut dq[r * rows..(r + 1) * rows];
            for (i, dl) in delta.iter_mut().enumerate() {
                *dl = dot(&dout[i * d..(i + 1) * d], &o[i * d..(i + 1) * d]);
            }
            for j0 in (0..s.k_len).step_by(BC) {
                let bc = BC.min(s.k_len - j0);
                for i0 in (0..s.q_len).step_by(BR) {
                    let br = BR.min(s.q_len - i0);
                    if m.key_end(s, i0 + br - 1) <= j0 {
                        continue; // every query of the block is before these keys
                    }
                    // P = exp(scores − lse), zero where masked.
                    mm((br, bc, d), &mut p, BC, false, &q[i0 * d..], (d, 1), &k[j0 * d..], (1, d), scale);
                    for rr in 0..br {
                        let i = i0 + rr;
                        let lim = m.key_end(s, i);
                        let row = &mut p[rr * BC..rr * BC + bc];
                        if lse[i] == T::NEG_INFINITY {
                            row.fill(T::ZERO);
                        } else if plain {
                            let valid = lim.saturating_sub(j0).min(bc);
                            exp_sum(&mut row[..valid], lse[i]);
                            row[valid..].fill(T::ZERO);
                        } else {
                            for (c, x) in row.iter_mut().enumerate() {
                                let j = j0 + c;
                                *x = match (j < lim).then(|| m.term(s, h, i, j)).flatten() {
                                    Some(t) => (*x + t - lse[i]).fast_exp(),
                                    None => T::ZERO,
                                };
                            }
                        }
                    }
                    // dv_j += Pᵀ · dO_i ; dP = dO_i · v_jᵀ
                    mm((bc, d, br), &mut dv[j0 * d..], d, true, &p, (1, BC), &dout[i0 * d..], (d, 1), T::ONE);
                    mm((br, bc, d), &mut dp, BC, false, &dout[i0 * d..], (d, 1), &v[j0 * d..], (1, d), T::ONE);
                    // dS = P ⊙ (dP − delta_i)
                    for rr in 0..br {
                        let dl = delta[i0 + rr];
                        let (p, dp) = (&p[rr * BC..rr * BC + bc], &mut dp[rr * BC..rr * BC + bc]);
                        dp.iter_mut().zip(p).for_each(|(d, &p)| *d = p * (*d - dl));
                        if let Some(db) = db.as_deref_mut() {
                            let at = (r * s.q_len + i0 + rr) * s.k_len + j0;
                            db[at..at + bc].iter_mut().zip(dp.iter()).for_each(|(b, &ds)| *b += ds);
                        }
                    }
                    // dq_i += scale · dS · k_j ; dk_j += scale · dSᵀ · q_i
                    mm((br, d, bc), &mut dq[i0 * d..], d, true, &dp, (BC, 1), &k[j0 * d..], (d, 1), scale);
                    mm((bc, d, br), &mut dk[j0 * d..], d, true, &dp, (1, BC), &q[i0 * d..], (d, 1), scale);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The whole score matrix, softmaxed, times v: the plain definition.
    fn naive(s: &Shape, m: &Mask<f64>, scale: f64, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
        let d = s.dim;
        let mut out = vec![0.0; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kv = (b * s.kv_heads + h / s.group()) * s.k_len * d;
                for i in 0..s.q_len {
                    let row = ((b * s.heads + h) * s.q_len + i) * d;
                    let sc: Vec<f64> = (0..s.k_len)
                        .map(|j| match (j < m.key_end(s, i)).then(|| m.term(s, h, i, j)).flatten() {
                            Some(t) => (0..d).map(|x| q[row + x] * k[kv + j * d + x]).sum::<f64>() * scale + t,
                            None => f64::NEG_INFINITY,
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if mx == f64::NEG_INFINITY {
                        continue;
                    }
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for (j, x) in sc.iter().enumerate() {
                        let p = (x - mx).exp() / z;
                        for e in 0..d {
                            out[row + e] += p * v[kv + j * d + e];
                        }
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    proptest! {
        #[test]
        fn forward_equals_the_naive_definition(
            batch in 1usize..3, kv_heads in 1usize..3, group in 1usize..3, q_len in 1usize..70,
            extra in 0usize..80, dim in 1usize..12, causal: bool, masked: bool, biased: bool, alibi: bool, seed: u64,
        ) {
            let heads = kv_heads * group;
            let k_len = q_len + extra;
            let s = Shape { batch, heads, kv_heads, q_len, k_len, dim };
            let allow: Vec<bool> = data(q_len * k_len, seed ^ 1).iter().map(|x| *x > -0.6).collect();
            let bias = data(heads * q_len * k_len, seed ^ 2);
            let slopes = data(heads, seed ^ 3).iter().map(|x| x.abs()).collect::<Vec<_>>();
            let m = Mask {
                causal,
                allow: masked.then_some(&allow[..]),
                bias: biased.then_some(&bias[..]),
                alibi: alibi.then_some(&slopes[..]),
            };
            let (q, k, v) = (data(batch * heads * q_len * dim, seed), data(batch * kv_heads * k_len * dim, seed ^ 4), data(batch * kv_heads * k_len * dim, seed ^ 5));
            let mut out = vec![0.0; q.len()];
            let mut lse = vec![0.0; batch * heads * q_len];
            forward(&s, &m, 0.37, &q, &k, &v, &mut out, &mut lse);
            let want = naive(&s, &m, 0.37, &q, &k, &v);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
    }

    /// The f32 passes (the vectorized ones training runs) agree with the f64 passes on causal
    /// multi-tile shapes with and without a per-score term.
    #[test]
    fn f32_passes_match_f64() {
        for (q_len, extra, biased) in [(150, 0, false), (97, 40, false), (130, 7, true)] {
            let (batch, heads, kv_heads, dim) = (2, 4, 2, 16);
            let k_len = q_len + extra;
            let s = Shape { batch, heads, kv_heads, q_len, k_len, dim };
            let (nq, nk) = (batch * heads * q_len * dim, batch * kv_heads * k_len * dim);
            let (q, k, v, dout) = (data(nq, 1), data(nk, 2), data(nk, 3), data(nq, 4));
            let bias = data(heads * q_len * k_len, 5);
            let run = |f32_: bool| -> Vec<Vec<f64>> {
                macro_rules! passes {
                    ($t:ty) => {{
                        let cv = |x: &[f64]| x.iter().map(|&v| v as $t).collect::<Vec<$t>>();
                        let (q, k, v, dout, bias) = (cv(&q), cv(&k), cv(&v), cv(&dout), cv(&bias));
                        let m = Mask { causal: true, allow: None, bias: biased.then_some(&bias[..]), alibi: None };
                        let (mut out, mut lse) = (vec![0.0 as $t; nq], vec![0.0 as $t; batch * heads * q_len]);
                        forward(&s, &m, 0.25, &q, &k, &v, &mut out, &mut lse);
                        let (mut dq, mut dk, mut dv) = (vec![0.0 as $t; nq], vec![0.0 as $t; nk], vec![0.0 as $t; nk]);
                        backward(&s, &m, 0.25, (&q, &k, &v), (&out, &lse, &dout), (&mut dq, &mut dk, &mut dv), None);
                        [out, dq, dk, dv].iter().map(|x| x.iter().map(|&v| v as f64).collect()).collect()
                    }};
                }
                if f32_ {
                    passes!(f32)
                } else {
                    passes!(f64)
                }
            };
            let (a, b) = (run(true), run(false));
            for (name, (x, y)) in ["out", "dq", "dk", "dv"].iter().zip(a.iter().zip(&b)) {
                for (x, y) in x.iter().zip(y) {
                    assert!((x - y).abs() < 2e-4 * (1.0 + y.abs()), "{name} ({q_len}+{extra}, bias {biased}): f32 {x} vs f64 {y}");
                }
            }
        }
    }
}
