//! augur-models: one Llama-family model definition, loaded from GGUF or from a safetensors
//! checkpoint with its HF `config.json`.
//!
//! - [`Config`]: plain-data hyperparameters.
//! - [`Llama`]: immutable weights (mmapped where the file allows) and the forward pass.
//! - [`State`]: the mutable run state of one sequence: KV cache and scratch buffers.
//! - [`Model`]: weights + tokenizer + chat template, as opened from a path.
//! - [`hub`]: the default model and its cache (fetched through pip on first use).

mod config;
mod error;
pub mod hub;
mod llama;
mod model;
mod state;
pub mod tiny;

pub use config::{Config, RopeScaling};
pub use error::{Error, Result};
pub use llama::{Llama, Logits};
pub use model::{write_truncated_gguf, Model};
pub use state::{Activations, State};

/// Most rows one batched forward pass keeps on the integer path.
pub const MAX_BATCH: usize = augur_kernels::matmul::ACTQ_MAX_BATCH;
