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
//!
//! Train a module (here: fit `y = 2x` with one Linear layer):
//!
//! ```
//! use augur_core::Tensor;
//! use augur_nn::layers::Linear;
//! use augur_nn::optim::{AdamW, Optimizer};
//! use augur_nn::{ModuleExt, Rng};
//!
//! let mut layer = Linear::new(1, 1, false, 0.1, &mut Rng::new(0));
//! let mut opt = AdamW::new(0.1, (0.9, 0.999), 1e-8, 0.0);
//! let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3, 1])?;
//! let y = Tensor::from_vec(vec![2.0, 4.0, 6.0], &[3, 1])?;
//! for _ in 0..200 {
//!     let err = layer.forward(&x)?.sub(&y)?;
//!     err.mul(&err)?.mean_all()?.backward()?;
//!     opt.step(&mut layer)?;
//!     layer.zero_grad();
//! }
//! let w = layer.weight.item()?;
//! assert!((w - 2.0).abs() < 0.05, "learned weight {w}");
//! # Ok::<(), augur_nn::Error>(())
//! ```

#![warn(missing_docs)]

pub mod amp;
pub mod dist;
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
