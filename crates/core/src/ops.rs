//! Compute ops on tensors. Primitive ops (elementwise maps, broadcasting binary ops, reductions over
//! the last dim, matmul, gather) plus fused ops (softmax, rms_norm, linear) that have a test
//! showing they equal their composition from primitives.

use augur_kernels::{matmul, vec as kv};

use crate::error::{invalid, Error, Result};
use crate::layout::broadcast_shape;
use crate::{DType, Tensor};

/// A binary elementwise op.
#[derive(Debug, Clone, Copy)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
}

impl BinaryOp {
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
        }
    }
}

/// A unary elementwise op.
#[derive(Debug, Clone, Copy)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Recip,
    Sqr,
    Silu,
    Sigmoid,
}

impl UnaryOp {
    fn apply(self, x: f32) -> f32 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Sqr => x * x,
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        }
    }
}

impl Tensor {
    /// Elementwise `op(self, rhs)` with numpy broadcasting; result is f32.
    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let shape = broadcast_shape("binary", self.shape(), rhs.shape())?;
        let a = self.broadcast_to(&shape)?.to_vec_f32()?;
        let b = rhs.broadcast_to(&shape)?.to_vec_f32()?;
        Tensor::from_vec(a.iter().zip(&b).map(|(&x, &y)| op.apply(x, y)).collect(), &shape)
    }

    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }

    /// Elementwise `op(self)`; result is f32.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        Tensor::from_vec(self.to_vec_f32()?.into_iter().map(|x| op.apply(x)).collect(), self.shape())
    }

    pub fn scale(&self, s: f32) -> Result<Tensor> {
        Tensor::from_vec(self.to_vec_f32()?.into_iter().map(|x| x * s).collect(), self.shape())
    }

    fn reduce_last(&self, op: &'static str, f: impl Fn(&[f32]) -> f32) -> Result<Tensor> {
        let Some(&n) = self.shape().last() else { return invalid(op, "cannot reduce a 0-d tensor") };
        let v = self.to_vec_f32()?;
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap() = 1;
        Tensor::from_vec(if n == 0 { vec![] } else { v.chunks_exact(n).map(f).collect() }, &shape)
    }

    /// Sum over the last dim, kept as size 1.
    pub fn sum_last(&self) -> Result<Tensor> {
        self.reduce_last("sum_last", |r| r.iter().sum())
    }

    /// Max over the last dim, kept as size 1.
    pub fn max_last(&self) -> Result<Tensor> {
        self.reduce_last("max_last", |r| r.iter().copied().fold(f32::NEG_INFINITY, f32::max))
    }

    /// Matrix product of f32-convertible tensors: `[.., m, k] x [.., k, n] -> [.., m, n]`
    /// (batch dims must match exactly).
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.shape(), rhs.shape());
        if a.len() < 2 || a.len() != b.len() || a[..a.len() - 2] != b[..b.len() - 2] || a[a.len() - 1] != b[b.len() - 2] {
            return Err(Error::ShapeMismatch { op: "matmul", lhs: a.to_vec(), rhs: b.to_vec() });
        }
        let r = a.len();
        let (m, k, n) = (a[r - 2], a[r - 1], b[r - 1]);
        let batch: usize = a[..r - 2].iter().product();
        let (x, y) = (self.to_vec_f32()?, rhs.to_vec_f32()?);
        let mut out = vec![0f32; batch * m * n];
        for bi in 0..batch {
            // SAFETY: pointers index inside the three contiguous buffers sized batch*m*k, batch*k*n, batch*m*n.
            unsafe {
                gemm::gemm(
                    m, n, k,
                    out.as_mut_ptr().add(bi * m * n), 1, n as isize, false,
                    x.as_ptr().add(bi * m * k), 1, k as isize,
                    y.as_ptr().add(bi * k * n), 1, n as isize,
                    0.0, 1.0, false, false, false, gemm::Parallelism::None,
                );
            }
        }
        let mut shape = a.to_vec();
        shape[r - 1] = n;
        Tensor::from_vec(out, &shape)
    }

    /// `self · wᵀ` for a weight `w` of shape `[out, in]` in any dtype, quantized included
    /// (the fused op behind `Linear`; it equals `self.matmul(w.to_f32().transpose(0, 1))`).
    pub fn linear(&self, w: &Tensor) -> Result<Tensor> {
        let m = w.matrix()?;
        let k = *self.shape().last().unwrap_or(&0);
        if k != m.k {
            return Err(Error::ShapeMismatch { op: "linear", lhs: self.shape().to_vec(), rhs: w.shape().to_vec() });
        }
        let x = self.to_vec_f32()?;
        let n_tok = x.len() / k.max(1);
        let mut y = vec![0f32; n_tok * m.rows];
        matmul::matmul(&m, &x, n_tok, &mut y);
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap() = m.rows;
        Tensor::from_vec(y, &shape)
    }

    /// Softmax over the last dim (fused; equals `exp(x - max) / sum(exp(x - max))`).
    pub fn softmax_last(&self) -> Result<Tensor> {
        let n = *self.shape().last().unwrap_or(&1);
        let mut v = self.to_vec_f32()?;
        for r in v.chunks_exact_mut(n.max(1)) {
            kv::softmax(r);
        }
        Tensor::from_vec(v, self.shape())
    }

    /// RMSNorm over the last dim with gain `w` (fused; equals `x * rsqrt(mean(x²) + eps) * w`).
    pub fn rms_norm(&self, w: &Tensor, eps: f32) -> Result<Tensor> {
        let n = *self.shape().last().unwrap_or(&1);
        if w.shape() != [n] {
            return Err(Error::ShapeMismatch { op: "rms_norm", lhs: self.shape().to_vec(), rhs: w.shape().to_vec() });
        }
        let (x, g) = (self.to_vec_f32()?, w.to_vec_f32()?);
        let mut out = vec![0f32; x.len()];
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            kv::rms_norm(xr, &g, eps, or);
        }
        Tensor::from_vec(out, self.shape())
    }

    /// Rows of a 2-d table (embedding lookup), dequantizing as needed: `[n] -> [n, dim]`.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (rows, dim) = self.dims2()?;
        let m = self.matrix()?;
        let mut out = vec![0f32; ids.len() * dim];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(dim.max(1))) {
            if id as usize >= rows {
                return invalid("gather_rows", format!("index {id} out of range for {rows} rows"));
            }
            m.row_f32(id as usize, dst);
        }
        Tensor::from_vec(out, &[ids.len(), dim])
    }

    /// Convert to another unquantized dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let v = self.to_vec_f32()?;
        match dtype {
            DType::F32 => Tensor::from_vec(v, self.shape()),
            DType::F16 => Tensor::from_f16(v.iter().map(|&x| half::f16::from_f32(x)).collect(), self.shape()),
            DType::BF16 => Tensor::from_bf16(v.iter().map(|&x| half::bf16::from_f32(x)).collect(), self.shape()),
            DType::Quant(_) => Err(Error::UnsupportedDType { op: "to_dtype", dtype, hint: " (quantize rows with QuantType::quantize_row)" }),
        }
    }
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
            let ms = x.unary(UnaryOp::Sqr).unwrap().sum_last().unwrap().scale(1.0 / c as f32).unwrap();
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
