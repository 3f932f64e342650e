//! The compute kernels behind the tensor ops, outside autograd: elementwise maps, broadcasting,
//! reductions, matmul and copies here; the fused kernels in [`fused`]. Each takes tensors of any
//! float dtype and computes in f64 when an input is f64, else in f32; the differentiable public
//! ops in `autograd::rules` call these and record how to differentiate them.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use augur_kernels::real::Real;
use rayon::prelude::*;

use crate::device::{device_of, on};
use crate::error::{invalid, Error, Result};
use crate::float::{compute_dtype, with_float, Float};
use crate::layout::broadcast_shape;
use crate::{DType, Layout, Tensor};

mod fused;
pub use fused::AttentionMask;
pub(crate) use fused::{attention, attention_backward, cross_entropy, cross_entropy_backward, gather_rows, norm, norm_backward, rope, scatter_add_rows, softmax_last};

/// Elements per parallel chunk of an elementwise op (smaller ops run on one thread).
const PAR_CHUNK: usize = 1 << 15;

/// A binary elementwise op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// `max(a, b)`.
    Max,
}

impl BinaryOp {
    #[inline(always)]
    fn apply<T: Real>(self, a: T, b: T) -> T {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
        }
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

/// A unary elementwise op. The `*Grad` variants are derivatives used by the backward rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    /// `-x`.
    Neg,
    /// `e^x`.
    Exp,
    /// `ln x`.
    Log,
    /// `√x`.
    Sqrt,
    /// `1 / x`.
    Recip,
    /// `x²`.
    Sqr,
    /// `|x|`.
    Abs,
    /// `x · sigmoid(x)`.
    Silu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh x`.
    Tanh,
    /// `max(x, 0)`.
    Relu,
    /// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`).
    Gelu,
    /// d silu(x) / dx.
    SiluGrad,
    /// d gelu(x) / dx.
    GeluGrad,
    /// 1 where x > 0, else 0 (d relu / dx).
    Step,
    /// sign(x) (d |x| / dx).
    Sign,
}

impl UnaryOp {
    #[inline(always)]
    fn apply<T: Real>(self, x: T) -> T {
        let one = T::ONE;
        let sig = |x: T| one / (one + (-x).fast_exp());
        // tanh through one exponential (saturates cleanly: e^{2u} → ∞ gives 1, → 0 gives −1).
        let tanh = |u: T| one - T::from_f64(2.0) / ((u + u).fast_exp() + one);
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.fast_exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Recip => one / x,
            UnaryOp::Sqr => x * x,
            UnaryOp::Abs => x.max(-x),
            UnaryOp::Silu => x * sig(x),
            UnaryOp::Sigmoid => sig(x),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Relu => x.max(T::ZERO),
            UnaryOp::Gelu => {
                let u = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(GELU_C) * x * x * x);
                T::from_f64(0.5) * x * (one + tanh(u))
            }
            UnaryOp::SiluGrad => {
                let s = sig(x);
                s * (one + x * (one - s))
            }
            UnaryOp::GeluGrad => {
                let c = T::from_f64(SQRT_2_OVER_PI);
                let k = T::from_f64(GELU_C);
                let t = tanh(c * (x + k * x * x * x));
                let half = T::from_f64(0.5);
                half * (one + t) + half * x * (one - t * t) * c * (one + T::from_f64(3.0) * k * x * x)
            }
            UnaryOp::Step => {
                if x > T::ZERO {
                    one
                } else {
                    T::ZERO
                }
            }
            UnaryOp::Sign => {
                if x > T::ZERO {
                    one
                } else if x < T::ZERO {
                    -one
                } else {
                    T::ZERO
                }
            }
        }
    }
}

/// A vector of `len` values written by `fill`, without zeroing them first (a memset of every
/// output cost ~5% of a training step).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn written<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out: Vec<MaybeUninit<T>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { out.set_len(len) };
    fill(&mut out);
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: the caller's fill wrote every element; MaybeUninit<T> has T's layout.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut T, out.len(), out.capacity()) }
}

augur_kernels::multiversion! {
    /// `out[i] = f(x[i])` (equal lengths), vectorized at the CPU's width.
    fn map_slice[T: Real, F: Fn(T) -> T](x: &[T], out: &mut [MaybeUninit<T>], f: &F) {
        out.iter_mut().zip(x).for_each(|(o, &x)| {
            o.write(f(x));
        });
    }
}

augur_kernels::multiversion! {
    /// `out[i] = f(x[i], y[i])` (equal lengths), vectorized at the CPU's width.
    fn zip_slice[T: Real, F: Fn(T, T) -> T](x: &[T], y: &[T], out: &mut [MaybeUninit<T>], f: &F) {
        out.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (&x, &y))| {
            o.write(f(x, y));
        });
    }
}

augur_kernels::multiversion! {
    /// `out[r·m + i] = f(x[r·m + i], y[i])`: `y` repeated along `x`'s rows of `m = y.len()`
    /// (`out` as long as `x`, a multiple of `m`).
    fn zip_rows[T: Real, F: Fn(T, T) -> T](x: &[T], y: &[T], out: &mut [MaybeUninit<T>], f: &F) {
        for (o, x) in out.chunks_mut(y.len()).zip(x.chunks(y.len())) {
            o.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (&x, &y))| {
                o.write(f(x, y));
            });
        }
    }
}

/// `f(x[i])` for every `i`, over chunks of the thread pool when long.
fn map_vec<T: Real>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    // SAFETY: map_slice writes every element of equally long chunks.
    unsafe {
        written(x.len(), |out| {
            if x.len() >= 2 * PAR_CHUNK {
                out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(o, x)| map_slice(x, o, &f));
            } else {
                map_slice(x, out, &f);
            }
        })
    }
}

/// `f(x[i], y[i])` for every `i` (equal lengths), over chunks of the thread pool when long.
fn zip_vec<T: Real>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert_eq!(x.len(), y.len(), "zip_vec: lengths differ");
    // SAFETY: zip_slice writes every element of equally long chunks.
    unsafe {
        written(x.len(), |out| {
            if x.len() >= 2 * PAR_CHUNK {
                out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK).zip(y.par_chunks(PAR_CHUNK))).for_each(|(o, (x, y))| zip_slice(x, y, o, &f));
            } else {
                zip_slice(x, y, out, &f);
            }
        })
    }
}

/// Run `$call` with `$f` bound to the op's function fixed at compile time (a const generic), so
/// each elementwise loop holds no dispatch and vectorizes.
macro_rules! per_variant {
    ($op:expr, $ty:ident, $fun:ident, [$($v:ident),*], |$f:ident| $call:expr) => {
        match $op {
            $($ty::$v => {
                let $f = |x, y| $fun::<{ $ty::$v as usize }, _>(x, y);
                $call
            })*
        }
    };
}

const UNARY: [UnaryOp; 16] = {
    use UnaryOp::*;
    [Neg, Exp, Log, Sqrt, Recip, Sqr, Abs, Silu, Sigmoid, Tanh, Relu, Gelu, SiluGrad, GeluGrad, Step, Sign]
};
const BINARY: [BinaryOp; 5] = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max];

#[inline(always)]
fn unary_c<const OP: usize, T: Real>(x: T, _: ()) -> T {
    const { UNARY[OP] }.apply(x)
}

/// `g · op(x)`: the gradient through an op whose derivative is the unary op `OP`.
#[inline(always)]
fn grad_c<const OP: usize, T: Real>(x: T, g: T) -> T {
    g * const { UNARY[OP] }.apply(x)
}

#[inline(always)]
fn binary_c<const OP: usize, T: Real>(x: T, y: T) -> T {
    const { BINARY[OP] }.apply(x, y)
}

pub(crate) fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    if let Some(d) = device_of("unary", &[x])? {
        return d.unary(x, op);
    }
    with_float!(compute_dtype(&[x]), T => {
        let v = x.values::<T>()?;
        let out = per_variant!(op, UnaryOp, unary_c, [Neg, Exp, Log, Sqrt, Recip, Sqr, Abs, Silu, Sigmoid, Tanh, Relu, Gelu, SiluGrad, GeluGrad, Step, Sign],
            |f| map_vec(&v, |x| f(x, ())));
        Ok(Tensor::from_values(out, x.shape()))
    })
}

/// `g · op'(x)` in one pass, for an op whose derivative is itself a [`UnaryOp`] (`grad`): the
/// backward of SiLU, GELU and ReLU without a tensor of derivatives in between.
pub(crate) fn unary_backward(x: &Tensor, g: &Tensor, grad: UnaryOp) -> Result<Tensor> {
    if x.shape() != g.shape() || device_of("unary_backward", &[x, g])?.is_some() {
        return binary(g, &unary(x, grad)?, BinaryOp::Mul);
    }
    with_float!(compute_dtype(&[x, g]), T => {
        let (v, gv) = (x.values::<T>()?, g.values::<T>()?);
        let out = per_variant!(grad, UnaryOp, grad_c, [Neg, Exp, Log, Sqrt, Recip, Sqr, Abs, Silu, Sigmoid, Tanh, Relu, Gelu, SiluGrad, GeluGrad, Step, Sign],
            |f| zip_vec(&v, &gv, f));
        Ok(Tensor::from_values(out, x.shape()))
    })
}

/// `x * mul + add`.
pub(crate) fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    if let Some(d) = device_of("affine", &[x])? {
        return d.affine(x, mul, add);
    }
    with_float!(compute_dtype(&[x]), T => {
        let v = x.values::<T>()?;
        let (m, a) = (T::from_f64(mul), T::from_f64(add));
        let out = map_vec(&v, |x| x * m + a);
        Ok(Tensor::from_values(out, x.shape()))
    })
}

/// Elementwise `op(a, b)` with numpy broadcasting.
pub(crate) fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let shape = broadcast_shape("binary", a.shape(), b.shape())?;
    if let Some(d) = device_of("binary", &[a, b])? {
        return d.binary(&on(&d, a)?, &on(&d, b)?, op, &shape);
    }
    let n: usize = shape.iter().product();
    with_float!(compute_dtype(&[a, b]), T => {
        let trailing = |t: &Tensor| {
            let s = t.shape();
            let lead = s.iter().take_while(|&&d| d == 1).count();
            shape.ends_with(&s[lead..])
        };
        let out = if a.shape() == shape.as_slice() && b.shape() == shape.as_slice() {
            let (x, y) = (a.values::<T>()?, b.values::<T>()?);
            per_variant!(op, BinaryOp, binary_c, [Add, Sub, Mul, Div, Max], |f| zip_vec(&x, &y, f))
        } else if a.shape() == shape.as_slice() && trailing(b) && b.numel() > 0 {
            // b repeats along the leading dims (a bias, a per-channel gain).
            let (x, y) = (a.values::<T>()?, b.values::<T>()?);
            let m = y.len();
            let chunk = m.max(PAR_CHUNK / m.max(1) * m);
            // SAFETY: x's chunks are whole rows of m, each written by zip_rows.
            per_variant!(op, BinaryOp, binary_c, [Add, Sub, Mul, Div, Max], |f| unsafe {
                written(n, |out| out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, x)| zip_rows(x, &y, o, &f)))
            })
        } else {
            let x = a.broadcast_to_raw(&shape)?.values::<T>()?.into_owned();
            let y = b.broadcast_to_raw(&shape)?.values::<T>()?.into_owned();
            per_variant!(op, BinaryOp, binary_c, [Add, Sub, Mul, Div, Max], |f| zip_vec(&x, &y, f))
        };
        Ok(Tensor::from_values(out, &shape))
    })
}

/// Sum `x` down to `shape` (the inverse of broadcasting `shape` up to `x`'s shape).
pub(crate) fn sum_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.detach());
    }
    if broadcast_shape("sum_to", shape, x.shape())? != x.shape() {
        return Err(Error::ShapeMismatch { op: "sum_to", lhs: x.shape().to_vec(), rhs: shape.to_vec() });
    }
    if let Some(d) = device_of("sum_to", &[x])? {
        return d.sum_to(x, shape);
    }
    with_float!(compute_dtype(&[x]), T => {
        let v = x.values::<T>()?;
        let mut out = vec![T::ZERO; shape.iter().product()];
        let lead = shape.iter().take_while(|&&d| d == 1).count();
        if x.shape().ends_with(&shape[lead..]) {
            // Sum of whole trailing blocks (a bias gradient).
            let m = out.len().max(1);
            for chunk in v.chunks(m) {
                out.iter_mut().zip(chunk).for_each(|(o, &c)| *o += c);
            }
        } else {
            let target = Layout::contiguous(shape).broadcast_to(x.shape())?;
            for (i, oi) in target.indices().enumerate() {
                out[oi] += v[i];
            }
        }
        Ok(Tensor::from_values(out, shape))
    })
}

/// Max over the last dim, kept as size 1.
pub(crate) fn max_last(x: &Tensor) -> Result<Tensor> {
    let Some(&n) = x.shape().last() else { return invalid("reduce", "cannot reduce the last dim of a 0-d tensor") };
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = 1;
    if let Some(d) = device_of("max_last", &[x])? {
        return d.max_last(x);
    }
    with_float!(compute_dtype(&[x]), T => {
        let v = x.values::<T>()?;
        let out: Vec<T> = if n == 0 {
            vec![]
        } else {
            v.chunks_exact(n).map(|r| r.iter().copied().fold(T::NEG_INFINITY, T::max)).collect()
        };
        Ok(Tensor::from_values(out, &shape))
    })
}

/// The storage of `t` as `T` with a layout to read it by: the tensor's own storage and layout when
/// it already holds `T`, else a contiguous converted copy.
fn strided<T: Float>(t: &Tensor) -> Result<(Cow<'_, [T]>, Layout)> {
    match T::slice(t.storage()) {
        Some(s) => Ok((Cow::Borrowed(s), t.layout().clone())),
        None => Ok((Cow::Owned(t.values::<T>()?.into_owned()), Layout::contiguous(t.shape()))),
    }
}

/// `[.., m, k] × [.., k, n] → [.., m, n]`; `b` may also be 2-d (shared by every batch). Strided
/// inputs (transposed views) are read in place.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_to(a, b, None)
}

/// [`matmul`] with its output in `out` (a device writes it directly; the host converts).
pub(crate) fn matmul_to(a: &Tensor, b: &Tensor, out: Option<DType>) -> Result<Tensor> {
    let (sa, sb) = (a.shape(), b.shape());
    let r = sa.len();
    let bad = || Error::ShapeMismatch { op: "matmul", lhs: sa.to_vec(), rhs: sb.to_vec() };
    if r < 2 || sb.len() < 2 || (sb.len() != 2 && sb.len() != r) || sa[r - 1] != sb[sb.len() - 2] {
        return Err(bad());
    }
    if sb.len() == r && sa[..r - 2] != sb[..r - 2] {
        return Err(bad());
    }
    let mut shape = sa.to_vec();
    shape[r - 1] = sb[sb.len() - 1];
    if sb.len() == 2 && r > 2 {
        // A shared right-hand side: one [batch·m, k] × [k, n] product (one packing of `b`).
        let k = sa[r - 1];
        let a2 = if a.layout().is_contiguous() { a.reshape_raw(&[a.numel() / k.max(1), k])? } else { contiguous(a)?.reshape_raw(&[a.numel() / k.max(1), k])? };
        return matmul_to(&a2, b, out)?.reshape_raw(&shape);
    }
    if let Some(d) = device_of("matmul", &[a, b])? {
        return d.matmul(&on(&d, a)?, &on(&d, b)?, &shape, out);
    }
    let (m, k, n) = (sa[r - 2], sa[r - 1], sb[sb.len() - 1]);
    let batch: usize = sa[..r - 2].iter().product();
    let product = with_float!(compute_dtype(&[a, b]), T => {
        let (x, lx) = strided::<T>(a)?;
        let (y, ly) = strided::<T>(b)?;
        let at = |l: &Layout, bi: usize| {
            let rank = l.shape().len();
            let mut idx = vec![0; rank];
            let mut rem = bi;
            for d in (0..rank.saturating_sub(2)).rev() {
                idx[d] = rem % l.shape()[d];
                rem /= l.shape()[d];
            }
            l.index(&idx)
        };
        let st = |l: &Layout| {
            let s = l.strides();
            (s[s.len() - 2] as isize, s[s.len() - 1] as isize)
        };
        let ((xr, xc), (yr, yc)) = (st(&lx), st(&ly));
        let one = |bi: usize, o: &mut [MaybeUninit<T>], par: gemm::Parallelism| {
            let (xo, yo) = (at(&lx, bi), if sb.len() == 2 { ly.offset() } else { at(&ly, bi) });
            // SAFETY: the offsets and strides come from the layouts of `x` and `y`, whose every
            // index lies inside the storage; `o` holds exactly m×n elements, all written
            // row-major (read_dst is false).
            unsafe {
                gemm::gemm(
                    m, n, k,
                    o.as_mut_ptr() as *mut T, 1, n as isize, false,
                    x.as_ptr().add(xo), xc, xr,
                    y.as_ptr().add(yo), yc, yr,
                    T::ZERO, T::ONE, false, false, false, par,
                );
            }
        };
        // SAFETY: every branch writes all batch·m·n elements (gemm does not read its destination).
        let out = unsafe {
            written(batch * m * n, |out| {
                if m * n * k == 0 {
                    // The product of empty matrices is zero.
                    out.iter_mut().for_each(|o| {
                        o.write(T::ZERO);
                    });
                } else if batch > 1 && m * n * k < 1 << 21 {
                    out.par_chunks_mut(m * n).enumerate().for_each(|(bi, o)| one(bi, o, gemm::Parallelism::None));
                } else {
                    let par = if m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
                    for (bi, o) in out.chunks_mut(m * n).enumerate() {
                        one(bi, o, par);
                    }
                }
            })
        };
        Tensor::from_values(out, &shape)
    });
    match out {
        Some(d) if d != product.dtype() => to_dtype(&product, d),
        _ => Ok(product),
    }
}

/// `(outer, inner)` sizes around `dim`: the tensor is `outer` slabs of `shape[dim] × inner`.
fn around(shape: &[usize], dim: usize) -> (usize, usize) {
    (shape[..dim].iter().product(), shape[dim + 1..].iter().product())
}

/// Concatenation along `dim`.
pub(crate) fn cat(ts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let Some(first) = ts.first() else { return invalid("cat", "needs at least one tensor") };
    let r = first.rank();
    if dim >= r {
        return invalid("cat", format!("dim {dim} out of range for rank {r}"));
    }
    let mut shape = first.shape().to_vec();
    shape[dim] = 0;
    for t in ts {
        let s = t.shape();
        if s.len() != r || s.iter().enumerate().any(|(i, &d)| i != dim && d != first.shape()[i]) {
            return Err(Error::ShapeMismatch { op: "cat", lhs: first.shape().to_vec(), rhs: s.to_vec() });
        }
        shape[dim] += s[dim];
    }
    if let Some(d) = device_of("cat", ts)? {
        let on_dev: Vec<Tensor> = ts.iter().map(|t| on(&d, t)).collect::<Result<_>>()?;
        return d.cat(&on_dev.iter().collect::<Vec<_>>(), dim, &shape);
    }
    let (outer, inner) = around(&shape, dim);
    with_float!(compute_dtype(ts), T => {
        let vals: Vec<_> = ts.iter().map(|t| t.values::<T>()).collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for (t, v) in ts.iter().zip(&vals) {
                let w = t.shape()[dim] * inner;
                out.extend_from_slice(&v[o * w..(o + 1) * w]);
            }
        }
        Ok(Tensor::from_values(out, &shape))
    })
}

/// `g` placed at `start..start+len` of a zero tensor whose `dim` has size `full` (the adjoint of narrow).
pub(crate) fn pad(g: &Tensor, dim: usize, start: usize, full: usize) -> Result<Tensor> {
    if let Some(d) = device_of("pad", &[g])? {
        return d.pad(g, dim, start, full);
    }
    let mut shape = g.shape().to_vec();
    let len = shape[dim];
    shape[dim] = full;
    let (outer, inner) = around(&shape, dim);
    with_float!(compute_dtype(&[g]), T => {
        let v = g.values::<T>()?;
        let mut out = vec![T::ZERO; shape.iter().product()];
        for o in 0..outer {
            let src = &v[o * len * inner..(o + 1) * len * inner];
            out[(o * full + start) * inner..(o * full + start + len) * inner].copy_from_slice(src);
        }
        Ok(Tensor::from_values(out, &shape))
    })
}

/// The values contiguous in the compute dtype: `x` itself when it already is (tensors are
/// immutable), else a copy.
pub(crate) fn contiguous(x: &Tensor) -> Result<Tensor> {
    if let Some(d) = device_of("contiguous", &[x])? {
        // On a device 16-bit tensors stay 16-bit (autocast activations, as in PyTorch).
        let ty = if matches!(x.dtype(), DType::BF16 | DType::F16) { x.dtype() } else { compute_dtype(&[x]) };
        if x.layout().is_contiguous() && x.dtype() == ty {
            return Ok(x.detach());
        }
        return d.copy(x, ty);
    }
    if x.layout().is_contiguous() && x.layout().offset() == 0 && x.dtype() == compute_dtype(&[x]) {
        return Ok(x.detach());
    }
    with_float!(compute_dtype(&[x]), T => Ok(Tensor::from_values(x.values::<T>()?.into_owned(), x.shape())))
}

/// Conversion to another unquantized dtype (rounding to nearest for f16/bf16); `x` itself when it
/// is already contiguous in that type.
pub(crate) fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype && x.layout().is_contiguous() && x.layout().offset() == 0 && !dtype.is_quantized() {
        return Ok(x.detach());
    }
    if let (Some(d), false) = (device_of("to_dtype", &[x])?, dtype.is_quantized()) {
        return d.copy(x, dtype);
    }
    match dtype {
        DType::F64 => Ok(Tensor::from_values(x.values::<f64>()?.into_owned(), x.shape())),
        DType::F32 => Ok(Tensor::from_values(x.values::<f32>()?.into_owned(), x.shape())),
        DType::F16 => Tensor::from_f16(x.values::<f32>()?.iter().map(|&v| half::f16::from_f32(v)).collect(), x.shape()),
        DType::BF16 => Tensor::from_bf16(x.values::<f32>()?.iter().map(|&v| half::bf16::from_f32(v)).collect(), x.shape()),
        DType::Quant(_) => Err(Error::UnsupportedDType { op: "to_dtype", dtype, hint: " (quantize rows with QuantType::quantize_row)" }),
    }
}

/// `x · wᵀ` for a weight `[out, in]` in a kernel dtype (quantized, f16, bf16, f32): the inference
/// kernels' batched dequantize-and-dot.
pub(crate) fn linear_weights(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(d) = device_of("linear", &[x, w])? {
        let w = on(&d, w)?;
        return matmul(x, &w.transpose_raw(0, 1)?);
    }
    let m = w.matrix()?;
    let k = *x.shape().last().unwrap_or(&0);
    if k != m.k {
        return Err(Error::ShapeMismatch { op: "linear", lhs: x.shape().to_vec(), rhs: w.shape().to_vec() });
    }
    let xv = x.values::<f32>()?;
    let n_tok = xv.len() / k.max(1);
    let mut y = vec![0f32; n_tok * m.rows];
    augur_kernels::matmul::matmul(&m, &xv, n_tok, &mut y);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = m.rows;
    Tensor::from_vec(y, &shape)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bytes, QuantType};
    use proptest::prelude::*;

    fn t(v: Vec<f32>, s: &[usize]) -> Tensor {
        Tensor::from_vec(v, s).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) -> bool {
        a.shape() == b.shape() && a.to_vec_f32().unwrap().iter().zip(b.to_vec_f32().unwrap()).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 250.0 - 2.0).collect()
    }

    proptest! {
        #[test]
        fn softmax_equals_its_composition(r in 1usize..5, c in 1usize..20, seed: u32) {
            let x = t(data(r * c, seed), &[r, c]);
            let e = x.sub(&x.max_last().unwrap()).unwrap().unary(UnaryOp::Exp).unwrap();
            let composed = e.div(&e.sum_last().unwrap()).unwrap();
            prop_assert!(close(&x.softmax_last().unwrap(), &composed, 1e-5));
        }

        #[test]
        fn rms_norm_equals_its_composition(r in 1usize..5, c in 1usize..40, seed: u32) {
            let x = t(data(r * c, seed), &[r, c]);
            let w = t(data(c, seed ^ 7), &[c]);
            let ms = x.unary(UnaryOp::Sqr).unwrap().sum_last().unwrap().scale(1.0 / c as f64).unwrap();
            let inv = ms.add(&t(vec![1e-5], &[1])).unwrap().unary(UnaryOp::Sqrt).unwrap().unary(UnaryOp::Recip).unwrap();
            let composed = x.mul(&inv).unwrap().mul(&w).unwrap();
            prop_assert!(close(&x.rms_norm(&w, 1e-5).unwrap(), &composed, 1e-4));
        }

        #[test]
        fn linear_equals_matmul_with_transposed_weight(n in 1usize..6, rows in 1usize..40, seed: u32) {
            let k = 64;
            let x = t(data(n * k, seed), &[n, k]);
            let wf = data(rows * k, seed ^ 3);
            let q: Vec<u8> = wf.chunks(k).flat_map(|r| QuantType::Q8_0.quantize_row(r)).collect();
            let w = Tensor::from_raw(DType::Quant(QuantType::Q8_0), Bytes::from_vec(q), &[rows, k]).unwrap();
            let composed = x.matmul(&w.to_f32().unwrap().transpose(0, 1).unwrap()).unwrap();
            prop_assert!(close(&x.linear(&w).unwrap(), &composed, 1e-4));
        }

        #[test]
        fn transpose_then_contiguous_matches_index_math(r in 1usize..6, c in 1usize..6) {
            let x = t((0..r * c).map(|v| v as f32).collect(), &[r, c]);
            let y = x.transpose(0, 1).unwrap().to_vec_f32().unwrap();
            for i in 0..c { for j in 0..r { prop_assert_eq!(y[i * r + j], (j * c + i) as f32); } }
        }
    }

    #[test]
    fn op_tables_follow_declaration_order() {
        assert!(UNARY.iter().enumerate().all(|(i, &o)| o as usize == i));
        assert!(BINARY.iter().enumerate().all(|(i, &o)| o as usize == i));
    }

    #[test]
    fn broadcasting_add() {
        let a = t(vec![1., 2., 3.], &[3, 1]);
        let b = t(vec![10., 20.], &[2]);
        assert_eq!(a.add(&b).unwrap().to_vec_f32().unwrap(), vec![11., 21., 12., 22., 13., 23.]);
        assert!(a.add(&t(vec![0.; 4], &[4, 1])).is_err());
    }

    #[test]
    fn gather_rows_checks_range() {
        let e = t(vec![0., 1., 2., 3.], &[2, 2]);
        assert_eq!(e.gather_rows(&[1, 0]).unwrap().to_vec_f32().unwrap(), vec![2., 3., 0., 1.]);
        assert!(e.gather_rows(&[2]).is_err());
    }

    #[test]
    fn raw_size_is_checked() {
        let err = Tensor::from_raw(DType::Quant(QuantType::Q4_0), Bytes::from_vec(vec![0; 17]), &[1, 32]).unwrap_err();
        assert!(err.to_string().contains("needs 18"), "{err}");
        assert!(Tensor::from_raw(DType::Quant(QuantType::Q4_0), Bytes::from_vec(vec![0; 18]), &[1, 31]).is_err());
    }
}
