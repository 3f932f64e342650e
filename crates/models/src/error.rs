/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    /// Reading a model file.
    Format(#[from] augur_formats::Error),
    #[error(transparent)]
    /// A tensor operation.
    Core(#[from] augur_core::Error),
    #[error("model config: {0}")]
    /// The model's configuration is missing something or inconsistent.
    Config(String),
    #[error("sequence of {need} tokens exceeds the model's context of {ctx}; shorten the prompt or lower --max-tokens")]
    /// A sequence does not fit the context.
    ContextFull {
        /// Positions the sequence needs.
        need: usize,
        /// The model's context length.
        ctx: usize,
    },
    #[error("token id {id} is outside the vocabulary (0..{vocab})")]
    /// A token id outside the vocabulary.
    UnknownToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    #[error("fetching the default model: {0}")]
    /// Fetching the default model failed (pip, network, checksum).
    Fetch(String),
    #[error("{path}: {msg}")]
    /// A path cannot be used as a model.
    Path {
        /// The path.
        path: std::path::PathBuf,
        /// What is wrong.
        msg: String,
    },
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    /// The CUDA backend (no driver or device, a failed launch, an unsupported shape).
    Cuda(#[from] augur_cuda::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
