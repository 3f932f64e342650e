//! The differentiable ops: each computes with a kernel from `ops` and records one short rule that
//! maps the output's gradient to its inputs' gradients, written with tensor ops. Ops with no
//! derivative say so with an error when a gradient reaches them.

use std::sync::Arc;

use super::record;
use crate::amp::autocast_dtype;
use crate::error::{invalid, Error, Result};
use crate::ops::{self, AttentionMask, BinaryOp, UnaryOp};
use crate::{DType, Tensor};

/// `Some(f())` when the gradient is wanted.
fn want(need: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    need.then(f).transpose()
}

fn not_differentiable(op: &'static str) -> Result<Vec<Option<Tensor>>> {
    Err(Error::Invalid { op, msg: "is not differentiable; compute it under no_grad or detach its input".into() })
}

/// Inputs of a matmul-like op, rounded to the autocast dtype when a scope is active.
fn autocast_in(t: &Tensor) -> Result<Tensor> {
    match autocast_dtype() {
        Some(d) if matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) && t.dtype() != d => t.to_dtype(d),
        _ => Ok(t.clone()),
    }
}

fn autocast_out(t: Tensor) -> Result<Tensor> {
    match autocast_dtype() {
        Some(d) if t.dtype() != d => ops::to_dtype(&t, d),
        _ => Ok(t),
    }
}

/// A gradient in its input's dtype (so a bf16 input gets a bf16 gradient).
fn like(g: Tensor, x: &Tensor) -> Result<Tensor> {
    if g.dtype() == x.dtype() || x.dtype().is_quantized() {
        Ok(g)
    } else {
        ops::to_dtype(&g, x.dtype())
    }
}

impl Tensor {
    // ---- views -------------------------------------------------------------------------------

    /// Same elements, new shape (copies first when the layout is not contiguous).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let src = if self.layout().is_contiguous() || self.dtype().is_quantized() { self.detach() } else { ops::contiguous(self)? };
        let out = src.reshape_raw(shape)?;
        let old = self.shape().to_vec();
        Ok(record(out, "reshape", &[self], move |g, _| Ok(vec![Some(g.reshape(&old)?)])))
    }

    /// Swap dimensions `a` and `b` (a strided view, no copy).
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        let out = self.transpose_raw(a, b)?;
        Ok(record(out, "transpose", &[self], move |g, _| Ok(vec![Some(g.transpose(a, b)?)])))
    }

    /// Elements `start..start+len` along `dim` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let out = self.narrow_raw(dim, start, len)?;
        let full = self.shape()[dim];
        Ok(record(out, "narrow", &[self], move |g, _| Ok(vec![Some(g.pad(dim, start, full)?)])))
    }

    /// `self` placed at `start..` along `dim` of zeros of size `full` (the adjoint of `narrow`).
    pub fn pad(&self, dim: usize, start: usize, full: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + self.shape()[dim] > full {
            return invalid("pad", format!("cannot place {:?} at {start} of size {full} along dim {dim}", self.shape()));
        }
        let out = ops::pad(self, dim, start, full)?;
        let len = self.shape()[dim];
        Ok(record(out, "pad", &[self], move |g, _| Ok(vec![Some(g.narrow(dim, start, len)?)])))
    }

    /// Broadcast to `shape` (NumPy rules: size-1 or missing leading dimensions stretch); a view.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        let out = self.broadcast_to_raw(shape)?;
        let old = self.shape().to_vec();
        Ok(record(out, "broadcast_to", &[self], move |g, _| Ok(vec![Some(g.sum_to(&old)?)])))
    }

    /// A contiguous copy (f32, or f64 for f64 tensors).
    pub fn contiguous(&self) -> Result<Tensor> {
        Ok(record(ops::contiguous(self)?, "contiguous", &[self], |g, _| Ok(vec![Some(g.clone())])))
    }

    /// Concatenation along `dim`.
    pub fn cat(ts: &[&Tensor], dim: usize) -> Result<Tensor> {
        let out = ops::cat(ts, dim)?;
        let sizes: Vec<usize> = ts.iter().map(|t| t.shape()[dim]).collect();
        Ok(record(out, "cat", ts, move |g, need| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for (&len, &n) in sizes.iter().zip(need) {
                grads.push(want(n, || g.narrow(dim, start, len))?);
                start += len;
            }
            Ok(grads)
        }))
    }

    // ---- elementwise -------------------------------------------------------------------------

    /// Elementwise `op(self, rhs)` with numpy broadcasting.
    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let out = ops::binary(self, rhs, op)?;
        let (a, b) = (self.detach(), rhs.detach());
        let y = out.clone();
        Ok(record(out, op.name(), &[self, rhs], move |g, need| {
            let (sa, sb) = (a.shape(), b.shape());
            Ok(match op {
                BinaryOp::Add => vec![want(need[0], || g.sum_to(sa))?, want(need[1], || g.sum_to(sb))?],
                BinaryOp::Sub => vec![want(need[0], || g.sum_to(sa))?, want(need[1], || g.neg()?.sum_to(sb))?],
                BinaryOp::Mul => vec![want(need[0], || g.mul(&b)?.sum_to(sa))?, want(need[1], || g.mul(&a)?.sum_to(sb))?],
                // d(a/b) = g/b, -g·a/b² = -g·y/b
                BinaryOp::Div => vec![want(need[0], || g.div(&b)?.sum_to(sa))?, want(need[1], || g.mul(&y)?.div(&b)?.neg()?.sum_to(sb))?],
                // The gradient goes to the larger input (to `a` on ties).
                BinaryOp::Max => {
                    let to_a = a.sub(&b)?.unary(UnaryOp::Step)?.add(&a.sub(&b)?.unary(UnaryOp::Abs)?.unary(UnaryOp::Sign)?.affine(-1.0, 1.0)?)?;
                    vec![want(need[0], || g.mul(&to_a)?.sum_to(sa))?, want(need[1], || g.mul(&to_a.affine(-1.0, 1.0)?)?.sum_to(sb))?]
                }
            })
        }))
    }

    /// Elementwise `self + rhs`, broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    /// Elementwise `self - rhs`, broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    /// Elementwise `self * rhs`, broadcasting.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    /// Elementwise `self / rhs`, broadcasting.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }
    /// Elementwise maximum, broadcasting (the gradient goes to the larger input; ties to `self`).
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Max)
    }

    /// Elementwise `op(self)`.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        let out = ops::unary(self, op)?;
        let x = self.detach();
        let y = out.clone();
        Ok(record(out, op.name(), &[self], move |g, _| {
            let d = match op {
                UnaryOp::Neg => g.neg()?,
                UnaryOp::Exp => g.mul(&y)?,
                UnaryOp::Log => g.div(&x)?,
                UnaryOp::Sqrt => g.div(&y.scale(2.0)?)?,
                UnaryOp::Recip => g.mul(&y.unary(UnaryOp::Sqr)?)?.neg()?,
                UnaryOp::Sqr => g.mul(&x.scale(2.0)?)?,
                UnaryOp::Abs => g.mul(&x.unary(UnaryOp::Sign)?)?,
                UnaryOp::Silu => ops::unary_backward(&x, g, UnaryOp::SiluGrad)?,
                UnaryOp::Sigmoid => g.mul(&y.mul(&y.affine(-1.0, 1.0)?)?)?,
                UnaryOp::Tanh => g.mul(&y.unary(UnaryOp::Sqr)?.affine(-1.0, 1.0)?)?,
                UnaryOp::Relu => ops::unary_backward(&x, g, UnaryOp::Step)?,
                UnaryOp::Gelu => ops::unary_backward(&x, g, UnaryOp::GeluGrad)?,
                UnaryOp::SiluGrad | UnaryOp::GeluGrad | UnaryOp::Step | UnaryOp::Sign => return not_differentiable(op.name()),
            };
            Ok(vec![Some(d)])
        }))
    }

    /// Elementwise `-self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg)
    }
    /// Elementwise `e^self`.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }
    /// Elementwise natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log)
    }
    /// Elementwise square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }
    /// Elementwise SiLU, `x · sigmoid(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }
    /// Elementwise GELU (tanh approximation, as GPT-2).
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Gelu)
    }
    /// Elementwise `max(x, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu)
    }
    /// Elementwise hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh)
    }
    /// Elementwise logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid)
    }

    /// `self × mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        let out = ops::affine(self, mul, add)?;
        Ok(record(out, "affine", &[self], move |g, _| Ok(vec![Some(g.affine(mul, 0.0)?)])))
    }

    /// `self · s` for a constant `s`.
    pub fn scale(&self, s: f64) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    // ---- reductions --------------------------------------------------------------------------

    /// Sum down to `shape` (which broadcasts to this tensor's shape).
    pub fn sum_to(&self, shape: &[usize]) -> Result<Tensor> {
        let out = ops::sum_to(self, shape)?;
        let full = self.shape().to_vec();
        Ok(record(out, "sum_to", &[self], move |g, _| Ok(vec![Some(g.broadcast_to(&full)?)])))
    }

    /// Sum of every element (0-d).
    pub fn sum_all(&self) -> Result<Tensor> {
        self.sum_to(&[])
    }

    /// Mean of every element (0-d).
    pub fn mean_all(&self) -> Result<Tensor> {
        self.sum_all()?.scale(1.0 / self.numel().max(1) as f64)
    }

    /// Sum over the last dim, kept as size 1.
    pub fn sum_last(&self) -> Result<Tensor> {
        let mut shape = self.shape().to_vec();
        let Some(last) = shape.last_mut() else { return invalid("sum_last", "cannot reduce a 0-d tensor") };
        *last = 1;
        self.sum_to(&shape)
    }

    /// Mean over the last dim, kept as size 1.
    pub fn mean_last(&self) -> Result<Tensor> {
        self.sum_last()?.scale(1.0 / *self.shape().last().unwrap_or(&1).max(&1) as f64)
    }

    /// Max over the last dim, kept as size 1 (not differentiable).
    pub fn max_last(&self) -> Result<Tensor> {
        Ok(record(ops::max_last(self)?, "max_last", &[self], |_, _| not_differentiable("max_last")))
    }

    // ---- linear algebra ----------------------------------------------------------------------

    /// `[.., m, k] × [.., k, n] → [.., m, n]`; `rhs` may be 2-d (shared across the batch).
    /// Runs in the autocast dtype inside an autocast scope.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = (autocast_in(self)?, autocast_in(rhs)?);
        let out = ops::matmul_to(&a, &b, autocast_dtype())?;
        let (ad, bd) = (a.detach(), b.detach());
        Ok(record(out, "matmul", &[&a, &b], move |g, need| {
            let r = ad.rank();
            // The gradient of a 16-bit product is 16-bit (as under PyTorch's autocast), so its
            // two products run on 16-bit inputs too.
            let g16;
            let g = match ad.dtype() {
                d @ (DType::BF16 | DType::F16) if g.dtype() != d && bd.dtype() == d => {
                    g16 = ops::to_dtype(g, d)?;
                    &g16
                }
                _ => g,
            };
            let da = want(need[0], || like(ops::matmul_to(g, &bd.transpose_raw(bd.rank() - 2, bd.rank() - 1)?, Some(ad.dtype()))?, &ad))?;
            let db = want(need[1], || {
                let d = if bd.rank() == 2 && r > 2 {
                    let (k, n) = (ad.shape()[r - 1], g.shape()[r - 1]);
                    let a2 = ad.reshape_raw(&[ad.numel() / k.max(1), k]).or_else(|_| ops::contiguous(&ad)?.reshape_raw(&[ad.numel() / k.max(1), k]))?;
                    let g2 = ops::contiguous(g)?.reshape_raw(&[g.numel() / n.max(1), n])?;
                    ops::matmul_to(&a2.transpose_raw(0, 1)?, &g2, Some(bd.dtype()))?
                } else {
                    ops::matmul_to(&ad.transpose_raw(r - 2, r - 1)?, g, Some(bd.dtype()))?
                };
                like(d, &bd)
            })?;
            Ok(vec![da, db])
        }))
    }

    /// `self · wᵀ` for a weight `[out, in]`. Trainable (f32/f64) weights go through `matmul`;
    /// frozen quantized or half-precision weights through the inference kernels, with a gradient
    /// for `self` only.
    pub fn linear(&self, w: &Tensor) -> Result<Tensor> {
        if matches!(w.dtype(), DType::F32 | DType::F64) || w.is_requires_grad() {
            if w.rank() != 2 {
                return invalid("linear", format!("weight must be [out, in], got {:?}", w.shape()));
            }
            // Cast before transposing: the product reads the transposed view in place.
            return self.matmul(&autocast_in(w)?.transpose(0, 1)?);
        }
        let out = ops::linear_weights(self, w)?;
        let (x, wd) = (self.detach(), w.detach());
        Ok(record(out, "linear_frozen", &[self], move |g, _| Ok(vec![Some(like(ops::matmul(g, &wd.to_f32()?)?, &x)?)])))
    }

    // ---- fused ops ---------------------------------------------------------------------------

    /// Softmax over the last dim.
    pub fn softmax_last(&self) -> Result<Tensor> {
        let out = ops::softmax_last(self, false)?;
        let y = out.clone();
        // dx = y ⊙ (g − Σ g⊙y)
        Ok(record(out, "softmax", &[self], move |g, _| Ok(vec![Some(y.mul(&g.sub(&g.mul(&y)?.sum_last()?)?)?)])))
    }

    /// Log-softmax over the last dim.
    pub fn log_softmax_last(&self) -> Result<Tensor> {
        let out = ops::softmax_last(self, true)?;
        let y = out.clone();
        // dx = g − softmax ⊙ Σ g
        Ok(record(out, "log_softmax", &[self], move |g, _| Ok(vec![Some(g.sub(&y.exp()?.mul(&g.sum_last()?)?)?)])))
    }

    /// RMSNorm over the last dim with gain `w`: `x / sqrt(mean(x²) + eps) ⊙ w`.
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        let out = ops::norm(self, w, None, eps, false)?;
        let (x, wd) = (self.detach(), w.detach());
        Ok(record(out, "rms_norm", &[self, w], move |g, need| {
            let (dx, dw, _) = ops::norm_backward(&x, &wd, g, eps, false)?;
            Ok(vec![need[0].then_some(dx), need[1].then_some(dw)])
        }))
    }

    /// LayerNorm over the last dim: `(x − mean) / sqrt(var + eps) ⊙ w + b`.
    pub fn layer_norm(&self, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let out = ops::norm(self, w, Some(b), eps, true)?;
        let (x, wd) = (self.detach(), w.detach());
        Ok(record(out, "layer_norm", &[self, w, b], move |g, need| {
            let (dx, dw, db) = ops::norm_backward(&x, &wd, g, eps, true)?;
            Ok(vec![need[0].then_some(dx), need[1].then_some(dw), db.filter(|_| need[2])])
        }))
    }

    /// Rows of a 2-d table (an embedding lookup): `[n] → [n, dim]`.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let out = ops::gather_rows(self, ids)?;
        let (ids, rows) = (Arc::<[u32]>::from(ids), self.shape()[0]);
        Ok(record(out, "gather_rows", &[self], move |g, _| Ok(vec![Some(ops::scatter_add_rows(g, &ids, rows)?)])))
    }

    /// Mean cross-entropy of `[n, classes]` logits against class ids; rows whose target equals
    /// `ignore` do not count (PyTorch's `ignore_index`).
    pub fn cross_entropy(&self, targets: &[u32], ignore: Option<u32>) -> Result<Tensor> {
        let (out, count) = ops::cross_entropy(self, targets, ignore)?;
        let (x, t) = (self.detach(), Arc::<[u32]>::from(targets));
        Ok(record(out, "cross_entropy", &[self], move |g, _| Ok(vec![Some(ops::cross_entropy_backward(&x, &t, ignore, count, g)?)])))
    }

    /// Rotary position embedding of `[.., seq, dim]` with `cos, sin: [seq, dim/2]` tables; pairs
    /// `(2i, 2i+1)` when `interleaved`, else `(i, i + dim/2)`.
    pub fn rope(&self, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
        let out = ops::rope(self, cos, sin, interleaved)?;
        let (c, s) = (cos.detach(), sin.detach());
        // A rotation's adjoint is the rotation by the opposite angle.
        Ok(record(out, "rope", &[self], move |g, _| Ok(vec![Some(ops::rope(g, &c, &s.neg()?, interleaved)?)])))
    }

    /// FlashAttention: `softmax(q·kᵀ·scale + bias + mask) · v` for `q: [b, h, q_len, d]` and
    /// `k, v: [b, kv_heads, k_len, d]` (grouped-query attention when `kv_heads < h`), without
    /// materialising the score matrix. `bias: [h, q_len, k_len]` is differentiable.
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, mask: &AttentionMask) -> Result<Tensor> {
        let (q, k, v) = (autocast_in(q)?, autocast_in(k)?, autocast_in(v)?);
        let (out, lse) = ops::attention(&q, &k, &v, bias, mask)?;
        let out = autocast_out(out)?;
        let (qd, kd, vd, od) = (q.detach(), k.detach(), v.detach(), out.detach());
        let bd = bias.map(Tensor::detach);
        let m = mask.clone();
        let mut inputs = vec![&q, &k, &v];
        inputs.extend(bias);
        Ok(record(out, "attention", &inputs, move |g, _| {
            let (dq, dk, dv, db) = ops::attention_backward((&qd, &kd, &vd), bd.as_ref(), &m, &od, &lse, g)?;
            let mut grads = vec![Some(like(dq, &qd)?), Some(like(dk, &kd)?), Some(like(dv, &vd)?)];
            if bd.is_some() {
                grads.push(db);
            }
            Ok(grads)
        }))
    }

    /// Conversion to another unquantized dtype; the gradient comes back in this tensor's dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let out = ops::to_dtype(self, dtype)?;
        let from = self.dtype();
        Ok(record(out, "to_dtype", &[self], move |g, _| Ok(vec![Some(ops::to_dtype(g, if from.is_quantized() { DType::F32 } else { from })?)])))
    }
}

impl BinaryOp {
    /// The op's canonical lower-case name (as in the registry).
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "maximum",
        }
    }
}

impl UnaryOp {
    /// The op's canonical lower-case name (as in the registry).
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Sqr => "sqr",
            UnaryOp::Abs => "abs",
            UnaryOp::Silu => "silu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::SiluGrad => "silu_grad",
            UnaryOp::GeluGrad => "gelu_grad",
            UnaryOp::Step => "step",
            UnaryOp::Sign => "sign",
        }
    }
}
