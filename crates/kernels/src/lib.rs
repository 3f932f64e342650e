//! augur-kernels: the lowest layer of augur.
//!
//! Everything here works on plain slices (`&[f32]`, `&[u8]` holding GGUF blocks); no tensor type,
//! no allocation in the hot functions. Each fast kernel has a plain scalar twin in [`reference`]
//! and a property test that compares the two.
//!
//! - [`quant`]: the GGUF block formats (layouts, dequantize, quantize).
//! - [`dot`]: quantized-row · f32-vector dot products, SIMD where the CPU has it.
//! - [`matmul`]: `y = x · Wᵀ` for quantized or f32 weights over a small batch of rows, in parallel.
//! - [`vec`]: RMSNorm, RoPE, softmax, SiLU, and the other per-row ops of a Llama layer.
//! - [`reference`]: the scalar twins.

#![warn(missing_docs)]

pub mod actq;
pub mod attention;
pub mod cpu;
pub mod dot;
pub mod dot_actq;
pub mod flash;
pub mod matmul;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod real;
pub mod reference;
pub mod vec;

pub use quant::QuantType;

#[cfg(test)]
mod testdata;
