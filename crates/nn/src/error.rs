use std::path::PathBuf;

/// Errors of the training library: a tensor op failed, a checkpoint is wrong, or a setting is invalid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    /// A tensor operation failed.
    Tensor(#[from] augur_core::Error),
    #[error(transparent)]
    /// A checkpoint file could not be read or written.
    Format(#[from] augur_formats::Error),
    #[error("{0}")]
    /// An invalid setting or input, with what to do.
    Invalid(String),
    #[error("{path}: {err}")]
    /// Reading or writing a file.
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    #[error("{path}: {err}")]
    /// A JSON file is malformed.
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: serde_json::Error,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}
