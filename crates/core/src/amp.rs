//! Autocast: a scope in which matmuls and attention run in bf16 or f16.
//!
//! Inside [`autocast`], `matmul`, `linear` and `attention` round their inputs to the low-precision
//! type, accumulate in f32 and return low-precision tensors, as mixed-precision GPU kernels do;
//! every other op (reductions, softmax, norms, losses) reads its inputs in f32 and returns f32.
//! The parameters stay f32 (master weights): the casts are ops in the graph, so their gradients
//! come back in f32.

use std::cell::Cell;

use crate::error::{invalid, Result};
use crate::DType;

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The low-precision type of the enclosing autocast scope, if any.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(Cell::get)
}

/// Runs `f` with matmuls and attention in `dtype` (bf16 or f16); `None` runs it in full precision.
pub fn autocast<R>(dtype: Option<DType>, f: impl FnOnce() -> R) -> Result<R> {
    if let Some(d) = dtype {
        if !matches!(d, DType::BF16 | DType::F16) {
            return invalid("autocast", format!("autocast runs in bf16 or f16, not {}", d.name()));
        }
    }
    let prev = AUTOCAST.with(|a| a.replace(dtype));
    struct Restore(Option<DType>);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTOCAST.with(|a| a.set(self.0));
        }
    }
    let _r = Restore(prev);
    Ok(f())
}
