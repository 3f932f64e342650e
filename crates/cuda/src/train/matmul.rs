//! Matrix products through cuBLAS: row-major `[.., m, k] × [.., k, n]` with transposed views read
//! in place (a transposed operand is a column-major one), batches as one strided-batched call.

use std::ffi::c_void;

use augur_core::{Backend, DType, Tensor};
use cudarc::cublas::sys::{self, cublasComputeType_t as Compute, cublasOperation_t as Op, cudaDataType_t as Ty};

use super::{core, cuda_err, Cuda};

/// How cuBLAS reads a row-major `rows × cols` operand: transposed (`true`) or not, with its
/// leading dimension, seen column-major (where row-major data is the transpose).
fn view(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(bool, usize)> {
    if cols == 1 || cs == 1 {
        let ld = if rows > 1 { rs } else { cols };
        (ld >= cols.max(1)).then_some((false, ld))
    } else if rows == 1 || rs == 1 {
        let ld = if cols > 1 { cs } else { rows };
        (ld >= rows.max(1)).then_some((true, ld))
    } else {
        None
    }
}

/// The batch stride of a tensor's leading dims when they collapse into one (0 for one batch).
fn batch_stride(t: &Tensor) -> Option<usize> {
    let r = t.rank();
    let (shape, strides) = (t.shape(), t.layout().strides());
    let dims: Vec<usize> = (0..r - 2).filter(|&d| shape[d] > 1).collect();
    match dims.last() {
        None => Some(0),
        Some(&last) => {
            let ok = dims.windows(2).all(|w| strides[w[0]] == strides[w[1]] * shape[w[1]] && w[1] == w[0] + 1);
            ok.then_some(strides[last])
        }
    }
}

fn ty(d: DType) -> Ty {
    match d {
        DType::F64 => Ty::CUDA_R_64F,
        DType::F16 => Ty::CUDA_R_16F,
        DType::BF16 => Ty::CUDA_R_16BF,
        _ => Ty::CUDA_R_32F,
    }
}

/// `a × b` into a new tensor of `shape`; the output type is `out` (16-bit inputs accumulate in
/// f32 and may write 16 bits) or the compute type.
pub(super) fn matmul(be: &Cuda, a: &Tensor, b: &Tensor, shape: &[usize], out: Option<DType>) -> core::Result<Tensor> {
    let half = a.dtype() == b.dtype() && matches!(a.dtype(), DType::BF16 | DType::F16);
    let wide = Cuda::compute(&[a, b]).0;
    if !half && out.is_some_and(|o| o != wide) {
        // cuBLAS writes 16 bits only from 16-bit inputs: compute, then convert.
        return be.copy(&matmul(be, a, b, shape, None)?, out.expect("checked"));
    }
    let (in_ty, out_ty) = if half { (a.dtype(), out.unwrap_or(DType::F32)) } else { (wide, wide) };
    let r = a.rank();
    let (m, k, n) = (a.shape()[r - 2], a.shape()[r - 1], b.shape()[r - 1]);
    let batch: usize = a.shape()[..r - 2].iter().product();
    if batch * m * n == 0 || k == 0 {
        // Nothing to add: the product over an empty inner dimension is zero.
        return Cuda::tensor(be.zeros(out_ty, batch * m * n)?, shape);
    }
    let c = be.alloc(out_ty, batch * m * n)?;
    // Each operand in the input type, readable in place (a transposed view) or copied dense.
    let operand = |t: &Tensor| -> core::Result<(Tensor, bool, usize, usize)> {
        let t = if t.dtype() == in_ty { t.clone() } else { be.copy(t, in_ty)? };
        let (rr, cc) = (t.shape()[r - 2], t.shape()[r - 1]);
        let st = t.layout().strides();
        if let (Some((tr, ld)), Some(bs)) = (view(rr, cc, st[r - 2], st[r - 1]), batch_stride(&t)) {
            return Ok((t, tr, ld, bs));
        }
        let d = be.copy(&t, in_ty)?;
        let bs = if batch > 1 { rr * cc } else { 0 };
        Ok((d, false, cc, bs))
    };
    let (ta, tra, lda, sa) = operand(a)?;
    let (tb, trb, ldb, sb) = operand(b)?;
    let (ap, bp) = (Cuda::ptr(&ta)?, Cuda::ptr(&tb)?);
    let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    let (one32, zero32, one64, zero64) = (1f32, 0f32, 1f64, 0f64);
    let (alpha, beta, compute) = if in_ty == DType::F64 {
        (&one64 as *const f64 as *const c_void, &zero64 as *const f64 as *const c_void, Compute::CUBLAS_COMPUTE_64F)
    } else {
        (&one32 as *const f32 as *const c_void, &zero32 as *const f32 as *const c_void, Compute::CUBLAS_COMPUTE_32F)
    };
    let _p = be.prof_named(|| format!("matmul {m}x{k}x{n} ×{batch} {}{} {}→{}", if tra { "T" } else { "N" }, if trb { "T" } else { "N" }, in_ty.name(), out_ty.name()));
    let blas = be.blas.lock().unwrap_or_else(|e| e.into_inner());
    let i32_of = |x: usize| i32::try_from(x).map_err(|_| cuda_err(format!("a matrix dimension of {x} is past cuBLAS's 32-bit sizes")));
    // Column-major: Cᵀ [n × m] = Bᵀ [n × k] · Aᵀ [k × m].
    // SAFETY: the operands are live device buffers whose views (leading dimensions, batch
    // strides) were derived from their layouts; `c` holds batch × m × n outputs; the handle
    // runs on the stream every other op of this backend uses.
    unsafe {
        let (h, ta, tb) = (*blas.handle(), op(trb), op(tra));
        let (mm, nn, kk, la, lb, lc) = (i32_of(n)?, i32_of(m)?, i32_of(k)?, i32_of(ldb)?, i32_of(lda)?, i32_of(n)?);
        let (pa, pb, pc) = (bp as *const c_void, ap as *const c_void, c.ptr as *mut c_void);
        let (ti, to) = (ty(in_ty), ty(out_ty));
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT;
        if batch == 1 {
            // The plain call: cuBLAS's heuristics serve it better than a batch of one.
            cudarc::cublas::result::gemm_ex(h, ta, tb, mm, nn, kk, alpha, pa, ti, la, pb, ti, lb, beta, pc, to, lc, compute, algo)
        } else {
            cudarc::cublas::result::gemm_strided_batched_ex(h, ta, tb, mm, nn, kk, alpha, pa, ti, la, sb as i64, pb, ti, lb, sa as i64, beta, pc, to, lc, (m * n) as i64, i32_of(batch)?, compute, algo)
        }
    }
    .map_err(|e| cuda_err(format!("cuBLAS gemm ({m}×{k} · {k}×{n}, batch {batch}, {}): {e}", in_ty.name())))?;
    Cuda::tensor(c, shape)
}

#[cfg(test)]
mod tests {
    use super::view;

    #[test]
    fn operand_views() {
        // Row-major 3×4: not transposed, ld 4; its transposed view (strides 1, 4) is 4×3 read
        // transposed with ld 4.
        assert_eq!(view(3, 4, 4, 1), Some((false, 4)));
        assert_eq!(view(4, 3, 1, 4), Some((true, 4)));
        // A single row or column takes either reading.
        assert_eq!(view(1, 5, 0, 1), Some((false, 5)));
        assert_eq!(view(5, 1, 1, 0), Some((false, 1)));
        // Neither stride is 1: copy first.
        assert_eq!(view(3, 4, 8, 2), None);
    }
}
