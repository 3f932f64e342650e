use std::path::PathBuf;

/// What can go wrong preparing data or training a speculator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Running the target model.
    #[error(transparent)]
    Model(#[from] augur_models::Error),
    /// Tokenizing, templating or generating.
    #[error(transparent)]
    Decode(#[from] augur_decode::Error),
    /// A tensor operation.
    #[error(transparent)]
    Tensor(#[from] augur_core::Error),
    /// The training library.
    #[error(transparent)]
    Nn(#[from] augur_nn::Error),
    /// A file format.
    #[error(transparent)]
    Format(#[from] augur_formats::Error),
    /// Reading or writing a file.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// Input that cannot be used, with what to do about it.
    #[error("{0}")]
    Invalid(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.to_owned(), err }
}
