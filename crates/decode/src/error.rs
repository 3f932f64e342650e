/// Errors of decoding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    /// Loading or running the model.
    Model(#[from] augur_models::Error),
    #[error(transparent)]
    /// Tokenizer or file format.
    Format(#[from] augur_formats::Error),
    #[error("chat template: {0}")]
    /// Rendering the chat template.
    Template(String),
    #[error("invalid sampling setting: {0}")]
    /// Invalid sampling settings or inputs.
    Sampling(String),
    #[error(transparent)]
    /// A tensor operation (trained drafters).
    Tensor(#[from] augur_core::Error),
    #[error(transparent)]
    /// A neural-network module (trained drafters).
    Nn(#[from] augur_nn::Error),
    #[error("speculative decoding: {0}")]
    /// Invalid speculative-decoding settings or drafter files.
    Spec(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
