use std::path::PathBuf;

/// Errors reading or writing model files. Each names the file part (key, tensor, offset) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message carries the cause itself (not as an error `source`, so error chains do not
    /// repeat it).
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    #[error("GGUF: {what} at byte offset {offset}; the file is truncated or corrupt (re-download or re-convert it)")]
    /// The GGUF structure is broken.
    Gguf {
        /// What could not be read.
        what: String,
        /// Where in the file.
        offset: u64,
    },
    #[error("GGUF metadata key `{key}`: {msg}")]
    /// A metadata key is missing or has the wrong type.
    Metadata {
        /// The key.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
    #[error("tensor `{name}`: {msg}")]
    /// A tensor's type, shape or data is wrong.
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    #[error("safetensors {path}: {msg}")]
    /// A safetensors file or index is wrong.
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    #[error("tokenizer: {0}")]
    /// The tokenizer could not be built or failed.
    Tokenizer(String),
    #[error(transparent)]
    /// A tensor operation failed.
    Core(#[from] augur_core::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
