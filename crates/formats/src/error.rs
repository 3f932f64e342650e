use std::path::PathBuf;

/// Errors reading or writing model files. Each names the file part (key, tensor, offset) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message carries the cause itself (not as an error `source`, so error chains do not
    /// repeat it).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("GGUF: {what} at byte offset {offset}; the file is truncated or corrupt (re-download or re-convert it)")]
    Gguf { what: String, offset: u64 },
    #[error("GGUF metadata key `{key}`: {msg}")]
    Metadata { key: String, msg: String },
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("safetensors {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Core(#[from] augur_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
