//! augur's CUDA backend.
//!
//! Kernels are CUDA C (`kernels.cu`), compiled by NVRTC for the device's own architecture at
//! first use and cached on disk as PTX; weights stay in their GGUF block layout on the device and
//! are dequantized in registers. [`GpuModel`] runs the Llama forward pass (prefill, decode,
//! tree verification) with the KV cache on the device. [`GpuModel::greedy`] keeps the argmax on
//! the device, so only token ids cross to the host: each step is one persistent launch of the
//! whole model (`decode.cu`, [`Decoder::Persistent`]) or a captured step of ~150 launches
//! replayed as a CUDA graph ([`Decoder::Graph`]). [`Flash`] is FlashAttention on tensor cores
//! (`flash.cu`), forward and backward, for prefill and training.
//!
//! Nothing CUDA is needed to build: `libcuda` and `libnvrtc` are loaded when a [`Device`] is
//! opened, which fails with a clear error where there is no driver or no device.
#![warn(missing_docs)]

mod device;
mod flash;
#[cfg(test)]
mod flash_tests;
mod mega;
mod model;
mod nccl;
mod ops;
#[cfg(test)]
mod tests;
pub mod train;

pub use device::{warm_cache, Device, Error, Result};
pub use flash::{forward_flops, Attention, Dtype, Flash, Io, Shape as FlashShape};
pub use nccl::{bus_bandwidth, Nccl, Place};
pub use model::{Decoder, Dims, GpuModel, GpuSeq, GreedyRun, LayerWeights, Out, Pass};
pub use ops::DevMat;
