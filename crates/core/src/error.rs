use crate::DType;

/// Errors of tensor construction and ops. Each names the op and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {lhs:?} vs {rhs:?}")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("{op}: dtype {dtype:?} is not supported here{hint}")]
    UnsupportedDType { op: &'static str, dtype: DType, hint: &'static str },
    #[error("tensor data has {got} bytes but shape {shape:?} of {dtype:?} needs {want}")]
    SizeMismatch { shape: Vec<usize>, dtype: DType, got: usize, want: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid { op, msg: msg.into() })
}
