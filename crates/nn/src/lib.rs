//! augur-nn: training on augur's tensor core.
//!
//! - [`module`]: the [`Module`] trait (named parameters, train/eval, freezing, safetensors
//!   save/load) and [`layers`] (Linear, Embedding, LayerNorm, RMSNorm, Dropout, SwiGLU and GELU
//!   MLPs, multi-head attention with GQA and a KV cache), each the stateless function of the same
//!   name in [`functional`] applied to its own parameters.
//! - [`posenc`]: sinusoidal, learned, RoPE (linear / NTK / YaRN / Llama-3 scaling), ALiBi, T5
//!   relative bias, none.
//! - [`optim`]: SGD with momentum, AdamW, warm-up + cosine schedules, gradient clipping.
//! - [`amp`]: autocast (bf16/f16 matmuls and attention) and the dynamic loss scaler.
//! - [`gpt`]: a small GPT assembled from all of the above.
//!
//! Autograd itself (requires_grad, backward, no_grad, detach) lives on `augur_core::Tensor`.

pub mod amp;
mod error;
pub mod functional;
pub mod gpt;
pub mod layers;
pub mod module;
pub mod optim;
pub mod posenc;
mod rng;
pub mod train;

pub use error::{Error, Result};
pub use gpt::{Gpt, GptConfig};
pub use module::{Module, ModuleExt};
pub use rng::Rng;
