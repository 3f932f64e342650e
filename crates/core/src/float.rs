//! The element types compute ops run in, tied to their storage.

use augur_kernels::real::Real;

use crate::{DType, Storage};

/// f32 or f64, with its storage variant.
pub(crate) trait Float: Real {
    fn slice(s: &Storage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> Storage;
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    fn slice(s: &Storage) -> Option<&[f32]> {
        match s {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<f32>) -> Storage {
        Storage::F32(v)
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Float for f64 {
    fn slice(s: &Storage) -> Option<&[f64]> {
        match s {
            Storage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<f64>) -> Storage {
        Storage::F64(v)
    }
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
}

/// Run `$body` with `$T` bound to the compute type of `$dtype`: f64 for f64 tensors, f32 otherwise.
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        if $dtype == $crate::DType::F64 {
            #[allow(dead_code)]
            type $T = f64;
            $body
        } else {
            #[allow(dead_code)]
            type $T = f32;
            $body
        }
    };
}
pub(crate) use with_float;

/// The compute dtype of several inputs.
pub(crate) fn compute_dtype(ts: &[&crate::Tensor]) -> DType {
    if ts.iter().any(|t| t.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    }
}
