//! [`Real`]: the float types the training kernels are written over (f32 for training, f64 for
//! gradient checks).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// An IEEE float type: `f32` or `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// −∞.
    const NEG_INFINITY: Self;
    /// Nearest value to `v`.
    fn from_f64(v: f64) -> Self;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// `e^self` (the fast vectorisable form for f32).
    fn exp(self) -> Self;
    /// `e^x` to about 1e-7 relative in f32 without a libm call (vectorizes); exact libm in f64.
    fn fast_exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// The larger of two values.
    fn max(self, o: Self) -> Self;
    /// Neither infinite nor NaN.
    fn is_finite(self) -> bool;
}

macro_rules! real {
    ($t:ty, $fast_exp:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn fast_exp(self) -> Self {
                $fast_exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}
real!(f32, crate::vec::exp);
real!(f64, f64::exp);

/// Pairwise sum of 16 lanes (a shuffle tree once vectorized; a sequential sum would be 15
/// dependent adds).
#[inline(always)]
pub fn hsum16<T: Real>(mut a: [T; 16]) -> T {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            a[i] += a[i + w];
        }
    }
    a[0]
}

/// Pairwise maximum of 16 lanes.
#[inline(always)]
pub fn hmax16<T: Real>(mut a: [T; 16]) -> T {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            a[i] = a[i].max(a[i + w]);
        }
    }
    a[0]
}

/// `Σ f(v)` over `x` in 16 lanes added pairwise, then the tail: a loop that vectorizes (inside
/// a `multiversion!` function, at the CPU's width).
#[inline(always)]
pub fn lane_sum<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            acc[l] += f(c[l]);
        }
    }
    let tail = chunks.remainder().iter().fold(T::ZERO, |s, &v| s + f(v));
    hsum16(acc) + tail
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = T::ZERO;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += *x * *y;
    }
    let (l, r) = acc.split_at(4);
    let mut h = [T::ZERO; 4];
    for i in 0..4 {
        h[i] = l[i] + r[i];
    }
    s + (h[0] + h[2]) + (h[1] + h[3])
}
