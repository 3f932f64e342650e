use std::path::PathBuf;

/// Errors of the training library: a tensor op failed, a checkpoint is wrong, or a setting is invalid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tensor(#[from] augur_core::Error),
    #[error(transparent)]
    Format(#[from] augur_formats::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Json { path: PathBuf, err: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}
