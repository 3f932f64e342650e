//! The fused compute kernels: softmax, the norms and their backward, embedding gather/scatter,
//! cross-entropy, RoPE and FlashAttention. Each has a composition or reference test (the ops tests,
//! `tests/gradcheck.rs`, and the kernels' own twins).

use std::mem::MaybeUninit;

use augur_kernels::flash;
use augur_kernels::real::{hsum16, lane_sum, Real};
use rayon::prelude::*;

use crate::device::{device_of, on};
use crate::error::{invalid, Error, Result};
use crate::float::{compute_dtype, with_float};
use crate::ops::written;
use crate::Tensor;

/// Softmax (or log-softmax) over the last dim.
pub(crate) fn softmax_last(x: &Tensor, log: bool) -> Result<Tensor> {
    let n = *x.shape().last().unwrap_or(&1);
    if let Some(d) = device_of("softmax", &[x])? {
        return d.softmax_last(x, log);
    }
    with_float!(compute_dtype(&[x]), T => {
        let mut v = x.values::<T>()?.into_owned();
        v.par_chunks_mut(n.max(1)).for_each(|r| {
            let mx = r.iter().copied().fold(T::NEG_INFINITY, T::max);
            let mx = if mx == T::NEG_INFINITY { T::ZERO } else { mx };
            let mut z = T::ZERO;
            if log {
                // (x - max) - ln Σ exp(x - max): finite even where exp(x - max) underflows.
                for e in r.iter_mut() {
                    *e -= mx;
                    z += e.fast_exp();
                }
                let lz = z.ln();
                r.iter_mut().for_each(|e| *e -= lz);
            } else {
                for e in r.iter_mut() {
                    *e = (*e - mx).fast_exp();
                    z += *e;
                }
                let inv = T::ONE / z;
                r.iter_mut().for_each(|e| *e *= inv);
            }
        });
        Ok(Tensor::from_values(v, x.shape()))
    })
}

fn norm_shapes(op: &'static str, x: &Tensor, w: &Tensor) -> Result<usize> {
    let n = *x.shape().last().unwrap_or(&0);
    if w.shape() != [n] || n == 0 {
        return Err(Error::ShapeMismatch { op, lhs: x.shape().to_vec(), rhs: w.shape().to_vec() });
    }
    Ok(n)
}

/// Per row: the mean (zero for RMSNorm) and `1 / sqrt(var + eps)`, summed in 16 lanes (so the
/// loops vectorize inside [`norm_rows`] and [`norm_backward_rows`]).
#[inline(always)]
fn row_stats<T: Real>(r: &[T], center: bool, eps: f64) -> (T, T) {
    let n = T::from_f64(r.len() as f64);
    let mu = if center { lane_sum(r, |x| x) / n } else { T::ZERO };
    let var = lane_sum(r, |x| (x - mu) * (x - mu)) / n;
    (mu, T::ONE / (var + T::from_f64(eps)).sqrt())
}

augur_kernels::multiversion! {
    /// [`norm`] over the rows of `x` (each `w.len()` long) into `out`.
    fn norm_rows[T: Real](x: &[T], w: &[T], b: Option<&[T]>, eps: f64, center: bool, out: &mut [MaybeUninit<T>]) {
        let n = w.len();
        for (o, r) in out.chunks_mut(n).zip(x.chunks(n)) {
            let (mu, rs) = row_stats(r, center, eps);
            match b {
                Some(b) => o.iter_mut().zip(r).zip(w.iter().zip(b)).for_each(|((o, &x), (&w, &b))| {
                    o.write((x - mu) * rs * w + b);
                }),
                None => o.iter_mut().zip(r).zip(w).for_each(|((o, &x), &w)| {
                    o.write((x - mu) * rs * w);
                }),
            }
        }
    }
}

augur_kernels::multiversion! {
    /// [`norm_backward`] over the rows of `x` and `g`: `dx` written, `dw` and `db` added to.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward_rows[T: Real](x: &[T], w: &[T], g: &[T], eps: f64, center: bool, dx: &mut [T], dw: &mut [T], db: &mut [T]) {
        let n = w.len();
        let nn = T::from_f64(n as f64);
        for ((dxr, xr), gr) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
            let (mu, rs) = row_stats(xr, center, eps);
            // dxr holds x̂ until the last pass.
            dxr.iter_mut().zip(xr).for_each(|(h, &x)| *h = (x - mu) * rs);
            dw.iter_mut().zip(db.iter_mut()).zip(gr.iter().zip(dxr.iter())).for_each(|((dw, db), (&g, &h))| {
                *dw += g * h;
                *db += g;
            });
            let (mut mg, mut mgx) = ([T::ZERO; 16], [T::ZERO; 16]);
            let whole = n / 16 * 16;
            for ((h, g), w) in dxr[..whole].chunks_exact(16).zip(gr[..whole].chunks_exact(16)).zip(w[..whole].chunks_exact(16)) {
                for l in 0..16 {
                    let gw = g[l] * w[l];
                    mg[l] += gw;
                    mgx[l] += gw * h[l];
                }
            }
            for i in whole..n {
                let gw = gr[i] * w[i];
                mg[0] += gw;
                mgx[0] += gw * dxr[i];
            }
            let (mg, mgx) = (hsum16(mg), hsum16(mgx));
            let (mg, mgx) = (if center { mg / nn } else { T::ZERO }, mgx / nn);
            dxr.iter_mut().zip(gr.iter().zip(w)).for_each(|(h, (&g, &w))| *h = rs * (g * w - mg - *h * mgx));
        }
    }
}

/// LayerNorm (`center`, with bias `b`) or RMSNorm (no centering, no bias) over the last dim.
pub(crate) fn norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64, center: bool) -> Result<Tensor> {
    let n = norm_shapes("norm", x, w)?;
    if let Some(b) = b {
        norm_shapes("norm", x, b)?;
    }
    if let Some(d) = device_of("norm", &[x, w])? {
        return d.norm(x, &on(&d, w)?, b.map(|b| on(&d, b)).transpose()?.as_ref(), eps, center);
    }
    with_float!(compute_dtype(&[x, w]), T => {
        let (xv, wv) = (x.values::<T>()?, w.values::<T>()?);
        let bv = b.map(|b| b.values::<T>()).transpose()?;
        let rows = (1 << 14) / n + 1;
        // SAFETY: norm_rows writes every element of its whole rows.
        let out = unsafe { written(xv.len(), |out| out.par_chunks_mut(rows * n).zip(xv.par_chunks(rows * n)).for_each(|(o, r)| norm_rows(r, &wv, bv.as_deref(), eps, center, o))) };
        Ok(Tensor::from_values(out, x.shape()))
    })
}

/// Gradients of [`norm`]: `(dx, dw, db)` (`db` only when centering).
pub(crate) fn norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64, center: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let n = norm_shapes("norm_backward", x, w)?;
    if let Some(d) = device_of("norm_backward", &[x, w, g])? {
        return d.norm_backward(&on(&d, x)?, &on(&d, w)?, &on(&d, g)?, eps, center);
    }
    with_float!(compute_dtype(&[x, w, g]), T => {
        let (xv, wv, gv) = (x.values::<T>()?, w.values::<T>()?, g.values::<T>()?);
        let mut dx = vec![T::ZERO; xv.len()];
        let rows = xv.len() / n;
        let per = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
        let partial: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(per * n)
            .enumerate()
            .map(|(c, dxc)| {
                let (mut dw, mut db) = (vec![T::ZERO; n], vec![T::ZERO; n]);
                let r0 = c * per * n;
                let len = dxc.len();
                norm_backward_rows(&xv[r0..r0 + len], &wv, &gv[r0..r0 + len], eps, center, dxc, &mut dw, &mut db);
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![T::ZERO; n], vec![T::ZERO; n]);
        for (pw, pb) in partial {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        Ok((Tensor::from_values(dx, x.shape()), Tensor::from_values(dw, &[n]), center.then(|| Tensor::from_values(db, &[n]))))
    })
}

/// Rows `ids` of a 2-d table: `[n] → [n, dim]` (an embedding lookup; quantized tables too).
pub(crate) fn gather_rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (rows, dim) = table.dims2()?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
        return invalid("gather_rows", format!("index {bad} out of range for {rows} rows"));
    }
    if let Some(d) = device_of("gather_rows", &[table])? {
        return d.gather_rows(table, ids);
    }
    if table.dtype().is_quantized() {
        let m = table.matrix()?;
        let mut out = vec![0f32; ids.len() * dim];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(dim.max(1))) {
            m.row_f32(id as usize, dst);
        }
        return Tensor::from_vec(out, &[ids.len(), dim]);
    }
    with_float!(compute_dtype(&[table]), T => {
        let v = table.values::<T>()?;
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            out.extend_from_slice(&v[id as usize * dim..(id as usize + 1) * dim]);
        }
        Ok(Tensor::from_values(out, &[ids.len(), dim]))
    })
}

/// The adjoint of [`gather_rows`]: adds row `i` of `g` into row `ids[i]` of a `[rows, dim]` zero table.
pub(crate) fn scatter_add_rows(g: &Tensor, ids: &[u32], rows: usize) -> Result<Tensor> {
    let (n, dim) = g.dims2()?;
    if n != ids.len() {
        return invalid("scatter_add_rows", format!("{n} gradient rows for {} ids", ids.len()));
    }
    if let Some(d) = device_of("scatter_add_rows", &[g])? {
        return d.scatter_add_rows(g, ids, rows);
    }
    with_float!(compute_dtype(&[g]), T => {
        let v = g.values::<T>()?;
        let mut out = vec![T::ZERO; rows * dim];
        for (&id, r) in ids.iter().zip(v.chunks_exact(dim.max(1))) {
            out[id as usize * dim..(id as usize + 1) * dim].iter_mut().zip(r).for_each(|(o, &x)| *o += x);
        }
        Ok(Tensor::from_values(out, &[rows, dim]))
    })
}

/// Mean cross-entropy of `[n, classes]` logits against class ids, skipping `ignore`d targets.
/// Returns the 0-d loss and the number of counted rows.
pub(crate) fn cross_entropy(logits: &Tensor, targets: &[u32], ignore: Option<u32>) -> Result<(Tensor, usize)> {
    let (n, c) = ce_shapes(logits, targets, ignore)?;
    if let Some(d) = device_of("cross_entropy", &[logits])? {
        return d.cross_entropy(logits, targets, ignore);
    }
    with_float!(compute_dtype(&[logits]), T => {
        let v = logits.values::<T>()?;
        let mut total = T::ZERO;
        let mut count = 0;
        for (r, &t) in v.chunks_exact(c).zip(targets).take(n) {
            if Some(t) == ignore {
                continue;
            }
            let mx = r.iter().copied().fold(T::NEG_INFINITY, T::max);
            let lse = mx + r.iter().map(|&x| (x - mx).fast_exp()).sum::<T>().ln();
            total += lse - r[t as usize];
            count += 1;
        }
        let loss = if count == 0 { T::ZERO } else { total / T::from_f64(count as f64) };
        Ok((Tensor::from_values(vec![loss], &[]), count))
    })
}

fn ce_shapes(logits: &Tensor, targets: &[u32], ignore: Option<u32>) -> Result<(usize, usize)> {
    let (n, c) = logits.dims2()?;
    if targets.len() != n {
        return invalid("cross_entropy", format!("{} targets for {n} rows of logits", targets.len()));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= c && Some(t) != ignore) {
        return invalid("cross_entropy", format!("target class {t} out of range for {c} classes"));
    }
    Ok((n, c))
}

/// `d loss / d logits` of [`cross_entropy`] times the upstream scalar `g`:
/// `(softmax(row) − onehot(target)) × g / count`.
pub(crate) fn cross_entropy_backward(logits: &Tensor, targets: &[u32], ignore: Option<u32>, count: usize, g: &Tensor) -> Result<Tensor> {
    let (_, c) = ce_shapes(logits, targets, ignore)?;
    if let Some(d) = device_of("cross_entropy", &[logits, g])? {
        return d.cross_entropy_backward(&on(&d, logits)?, targets, ignore, count, &on(&d, g)?);
    }
    let scale = if count == 0 { 0.0 } else { g.to_vec_f64()?[0] / count as f64 };
    with_float!(compute_dtype(&[logits, g]), T => {
        let mut v = logits.values::<T>()?.into_owned();
        let s = T::from_f64(scale);
        v.par_chunks_mut(c).zip(targets.par_iter()).for_each(|(r, &t)| {
            if Some(t) == ignore {
                r.fill(T::ZERO);
                return;
            }
            let mx = r.iter().copied().fold(T::NEG_INFINITY, T::max);
            let mut z = T::ZERO;
            for e in r.iter_mut() {
                *e = (*e - mx).fast_exp();
                z += *e;
            }
            let inv = s / z;
            r.iter_mut().for_each(|e| *e *= inv);
            r[t as usize] -= s;
        });
        Ok(Tensor::from_values(v, logits.shape()))
    })
}

/// Rotary embedding of `x: [.., seq, dim]` with per-position tables `cos, sin: [seq, dim/2]`;
/// pairs are `(2i, 2i+1)` when `interleaved`, else `(i, i + dim/2)` (HF's rotate-half).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let s = x.shape();
    if s.len() < 2 || !s[s.len() - 1].is_multiple_of(2) || cos.shape() != [s[s.len() - 2], s[s.len() - 1] / 2] || sin.shape() != cos.shape() {
        return Err(Error::ShapeMismatch { op: "rope", lhs: s.to_vec(), rhs: cos.shape().to_vec() });
    }
    if let Some(dev) = device_of("rope", &[x, cos, sin])? {
        return dev.rope(&on(&dev, x)?, &on(&dev, cos)?, &on(&dev, sin)?, interleaved);
    }
    let (seq, d) = (s[s.len() - 2], s[s.len() - 1]);
    let half = d / 2;
    with_float!(compute_dtype(&[x, cos]), T => {
        let (cs, sn) = (cos.values::<T>()?, sin.values::<T>()?);
        let mut v = x.values::<T>()?.into_owned();
        if v.is_empty() || d == 0 {
            return Ok(Tensor::from_values(v, s));
        }
        let rows = ((1 << 14) / d).max(1);
        v.par_chunks_mut(rows * d).enumerate().for_each(|(c, r)| rope_rows(r, &cs, &sn, c * rows, seq, half, interleaved));
        Ok(Tensor::from_values(v, s))
    })
}

augur_kernels::multiversion! {
    /// Rotate rows `first..` of a RoPE input (each `2 · half` wide) in place: row `i` sits at
    /// position `i % seq` of the `[seq, half]` tables.
    fn rope_rows[T: Real](x: &mut [T], cos: &[T], sin: &[T], first: usize, seq: usize, half: usize, interleaved: bool) {
        for (i, r) in x.chunks_exact_mut(2 * half).enumerate() {
            let t = (first + i) % seq;
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            let turn = |(a, b): (&mut T, &mut T), (&c, &s): (&T, &T)| {
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x0 * s + x1 * c;
            };
            if interleaved {
                r.chunks_exact_mut(2).zip(c.iter().zip(s)).for_each(|(p, cs)| {
                    if let [a, b] = p {
                        turn((a, b), cs)
                    }
                });
            } else {
                let (lo, hi) = r.split_at_mut(half);
                lo.iter_mut().zip(hi.iter_mut()).zip(c.iter().zip(s)).for_each(|(ab, cs)| turn(ab, cs));
            }
        }
    }
}

/// What an attention call masks and adds to its scores.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    /// Each query `i` sees keys up to `i + k_len − q_len`.
    pub causal: bool,
    /// `[q_len × k_len]`, true where attending is allowed (tree masks, padding).
    pub allow: Option<std::sync::Arc<[bool]>>,
    /// ALiBi slopes, one per query head.
    pub alibi: Option<Vec<f32>>,
    /// The scale of `q·k` (default `1/sqrt(head_dim)`).
    pub scale: Option<f32>,
}

fn attention_shape(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, m: &AttentionMask) -> Result<flash::Shape> {
    let bad = |msg: String| Error::Invalid { op: "attention", msg };
    let (&[b, h, tq, d], &[bk, hk, tk, dk]) = (q.shape(), k.shape()) else {
        return Err(bad(format!("q and k must be [batch, heads, len, dim], got {:?} and {:?}", q.shape(), k.shape())));
    };
    if bk != b || dk != d || v.shape() != k.shape() {
        return Err(bad(format!("q {:?}, k {:?} and v {:?} do not agree", q.shape(), k.shape(), v.shape())));
    }
    let s = flash::Shape { batch: b, heads: h, kv_heads: hk, q_len: tq, k_len: tk, dim: d };
    s.check(m.causal).map_err(bad)?;
    if m.allow.as_ref().is_some_and(|a| a.len() != tq * tk) {
        return Err(bad(format!("the allow mask must hold q_len × k_len = {} entries", tq * tk)));
    }
    if m.alibi.as_ref().is_some_and(|a| a.len() != h) {
        return Err(bad(format!("ALiBi needs one slope per query head ({h})")));
    }
    if bias.is_some_and(|t| t.shape() != [h, tq, tk]) {
        return Err(bad(format!("the score bias must be [heads, q_len, k_len] = [{h}, {tq}, {tk}], got {:?}", bias.map(|t| t.shape()))));
    }
    Ok(s)
}

/// The ALiBi slopes in the compute type and the score scale (default `1/sqrt(head_dim)`), shared
/// by the forward and backward passes.
fn flash_params<T: Real>(s: &flash::Shape, m: &AttentionMask) -> (Option<Vec<T>>, T) {
    let slopes = m.alibi.as_ref().map(|a| a.iter().map(|&x| T::from_f64(x as f64)).collect());
    (slopes, T::from_f64(m.scale.map_or(1.0 / (s.dim as f64).sqrt(), |x| x as f64)))
}

/// FlashAttention forward: `(out [b, h, q_len, d], lse [b, h, q_len])`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, m: &AttentionMask) -> Result<(Tensor, Tensor)> {
    let s = attention_shape(q, k, v, bias, m)?;
    let mut ins = vec![q, k, v];
    ins.extend(bias);
    if let Some(d) = device_of("attention", &ins)? {
        let bias = bias.map(|b| on(&d, b)).transpose()?;
        return d.attention(&s, &on(&d, q)?, &on(&d, k)?, &on(&d, v)?, bias.as_ref(), m);
    }
    with_float!(compute_dtype(&ins), T => {
        let (qv, kv, vv) = (q.values::<T>()?, k.values::<T>()?, v.values::<T>()?);
        let bv = bias.map(|b| b.values::<T>()).transpose()?;
        let (slopes, scale) = flash_params::<T>(&s, m);
        let mask = flash::Mask { causal: m.causal, allow: m.allow.as_deref(), bias: bv.as_deref(), alibi: slopes.as_deref() };
        let mut out = vec![T::ZERO; qv.len()];
        let mut lse = vec![T::ZERO; s.batch * s.heads * s.q_len];
        flash::forward(&s, &mask, scale, &qv, &kv, &vv, &mut out, &mut lse);
        Ok((Tensor::from_values(out, q.shape()), Tensor::from_values(lse, &[s.batch, s.heads, s.q_len])))
    })
}

/// FlashAttention-2 backward: `(dq, dk, dv, dbias)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    bias: Option<&Tensor>,
    m: &AttentionMask,
    out: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let s = attention_shape(q, k, v, bias, m)?;
    let mut ins = vec![q, k, v, out, g];
    ins.extend(bias);
    if let Some(d) = device_of("attention_backward", &ins)? {
        let bias = bias.map(|b| on(&d, b)).transpose()?;
        return d.attention_backward(&s, (&on(&d, q)?, &on(&d, k)?, &on(&d, v)?), bias.as_ref(), m, &on(&d, out)?, &on(&d, lse)?, &on(&d, g)?);
    }
    with_float!(compute_dtype(&ins), T => {
        let (qv, kv, vv) = (q.values::<T>()?, k.values::<T>()?, v.values::<T>()?);
        let (ov, lv, gv) = (out.values::<T>()?, lse.values::<T>()?, g.values::<T>()?);
        let bv = bias.map(|b| b.values::<T>()).transpose()?;
        let (slopes, scale) = flash_params::<T>(&s, m);
        let mask = flash::Mask { causal: m.causal, allow: m.allow.as_deref(), bias: bv.as_deref(), alibi: slopes.as_deref() };
        let (mut dq, mut dk, mut dv) = (vec![T::ZERO; qv.len()], vec![T::ZERO; kv.len()], vec![T::ZERO; vv.len()]);
        let mut db = bias.map(|_| vec![T::ZERO; s.heads * s.q_len * s.k_len]);
        flash::backward(&s, &mask, scale, (&qv, &kv, &vv), (&ov, &lv, &gv), (&mut dq, &mut dk, &mut dv), db.as_deref_mut());
        Ok((
            Tensor::from_values(dq, q.shape()),
            Tensor::from_values(dk, k.shape()),
            Tensor::from_values(dv, v.shape()),
            db.map(|d| Tensor::from_values(d, &[s.heads, s.q_len, s.k_len])),
        ))
    })
}
