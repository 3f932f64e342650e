/// Errors of decoding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] augur_models::Error),
    #[error(transparent)]
    Format(#[from] augur_formats::Error),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
    #[error("speculative decoding: {0}")]
    Spec(String),
}

pub type Result<T> = std::result::Result<T, Error>;
