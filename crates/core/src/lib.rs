//! augur-core: the tensor type every other crate builds on.
//!
//! A [`Tensor`] is a shared [`Storage`] (owned, or a region of an mmapped file) plus a strided
//! [`Layout`]. View ops (reshape, transpose, narrow) only change the layout; compute ops produce
//! new f32 tensors. Quantized storage is a first-class dtype: a quantized matrix multiplies f32
//! activations directly through the kernels crate, never through a dequantized copy.
//!
//! The same tensor trains: [`Tensor::requires_grad`] makes a leaf, the differentiable ops (one
//! derivative rule each, in `autograd::rules`) record a graph, and [`Tensor::backward`] fills the
//! leaves' gradients ([`autograd`]). Compute runs in f32, or f64 when an input is f64 (gradient
//! checks); inside [`amp::autocast`] matmuls and attention run in bf16 or f16. [`registry::OPS`]
//! lists every public op under its canonical name.

#![warn(missing_docs)]

pub mod amp;
pub mod autograd;
pub mod device;
mod dtype;
mod error;
mod float;
pub mod gradcheck;
mod layout;
mod ops;
mod storage;
pub mod registry;
mod tensor;

pub use autograd::{no_grad, NoGradGuard};
pub use device::{AdamStep, Backend, Device, DeviceBuffer};
pub use dtype::DType;
pub use ops::{AttentionMask, BinaryOp, UnaryOp};
pub use error::{Error, Result};
pub use layout::Layout;
pub use storage::{Bytes, Storage};
pub use tensor::Tensor;

pub use augur_kernels::QuantType;
