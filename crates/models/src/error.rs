/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] augur_formats::Error),
    #[error(transparent)]
    Core(#[from] augur_core::Error),
    #[error("model config: {0}")]
    Config(String),
    #[error("sequence of {need} tokens exceeds the model's context of {ctx}; shorten the prompt or lower --max-tokens")]
    ContextFull { need: usize, ctx: usize },
    #[error("token id {id} is outside the vocabulary (0..{vocab})")]
    UnknownToken { id: u32, vocab: usize },
    #[error("fetching the default model: {0}")]
    Fetch(String),
    #[error("{path}: {msg}")]
    Path { path: std::path::PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
