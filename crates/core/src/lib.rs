//! augur-core: the tensor type every other crate builds on.
//!
//! A [`Tensor`] is a shared [`Storage`] (owned, or a region of an mmapped file) plus a strided
//! [`Layout`]. View ops (reshape, transpose, narrow) only change the layout; compute ops produce
//! new f32 tensors. Quantized storage is a first-class dtype: a quantized matrix multiplies f32
//! activations directly through the kernels crate, never through a dequantized copy.

mod dtype;
mod error;
mod layout;
mod ops;
mod storage;
mod tensor;

pub use dtype::DType;
pub use error::{Error, Result};
pub use layout::Layout;
pub use storage::{Bytes, Storage};
pub use tensor::Tensor;

pub use augur_kernels::QuantType;
