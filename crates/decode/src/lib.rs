//! augur-decode: turning logits into text.
//!
//! - [`sampler`]: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.
//! - [`generate`]: the generation loop (prefill, decode, streaming, EOS and stop strings, timing).
//! - [`speculative`]: lossless speculative decoding (drafters, tree verification, acceptance).
//! - [`chat`]: the model's Jinja chat template, rendered with minijinja.

pub mod chat;
mod error;
pub mod generate;
pub mod rng;
pub mod sampler;
pub mod sequence;
pub mod speculative;
mod stop;

pub use error::{Error, Result};
pub use generate::{generate, generate_in, GenerateConfig, Session, StopReason, Summary, TokenEvent};
pub use sampler::{Sampler, SamplerConfig};
