use crate::DType;

/// Errors of tensor construction and ops. Each names the op and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {lhs:?} vs {rhs:?}")]
    /// Operand shapes do not fit together.
    ShapeMismatch {
        /// The op that failed.
        op: &'static str,
        /// Shape of the first operand.
        lhs: Vec<usize>,
        /// Shape of the second operand.
        rhs: Vec<usize>,
    },
    #[error("{op}: {msg}")]
    /// An invalid argument.
    Invalid {
        /// The op that failed.
        op: &'static str,
        /// What was wrong and what to do.
        msg: String,
    },
    #[error("{op}: dtype {dtype:?} is not supported here{hint}")]
    /// The op does not run on this dtype.
    UnsupportedDType {
        /// The op that failed.
        op: &'static str,
        /// The dtype it was given.
        dtype: DType,
        /// What to use instead (may be empty).
        hint: &'static str,
    },
    #[error("tensor data has {got} bytes but shape {shape:?} of {dtype:?} needs {want}")]
    /// Raw data does not match its shape.
    SizeMismatch {
        /// The requested shape.
        shape: Vec<usize>,
        /// The element type.
        dtype: DType,
        /// Bytes supplied.
        got: usize,
        /// Bytes the shape needs.
        want: usize,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid { op, msg: msg.into() })
}
