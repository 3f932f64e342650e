//! augur-decode: turning logits into text.
//!
//! - [`sampler`]: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.
//! - [`generate`]: the generation loop (prefill, decode, streaming, EOS and stop strings, timing).
//! - [`speculative`]: lossless speculative decoding (drafters, tree verification, acceptance).
//! - [`chat`]: the model's Jinja chat template, rendered with minijinja.
//!
//! Generate, streaming each token as it comes, then the same with speculative decoding (prompt
//! lookup), which gives the same greedy output in fewer target passes:
//!
//! ```
//! use std::ops::ControlFlow;
//! use augur_decode::speculative::{self, PromptLookup, SpecConfig};
//! use augur_decode::{generate, GenerateConfig, SamplerConfig};
//! use augur_models::{tiny, Model};
//!
//! let path = std::env::temp_dir().join(format!("augur-doc-decode-{}.gguf", std::process::id()));
//! tiny::write_gguf(&path, false, Some(augur_core::QuantType::Q8_0), 1)?;
//! let model = Model::open(&path)?;
//! let prompt = model.tokenizer.encode("one two three one two three one two")?;
//! let cfg = GenerateConfig { max_tokens: 16, sampler: SamplerConfig::default(), ..Default::default() };
//!
//! let mut streamed = String::new();
//! let plain = generate(&model, &prompt, &cfg, |t| {
//!     streamed.push_str(t.text);
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(streamed, plain.text);
//!
//! let mut drafter = PromptLookup::new(3, 1);
//! let (fast, stats) = speculative::generate(&model, &prompt, &cfg, &SpecConfig::new(6), &mut drafter, |_| ControlFlow::Continue(()))?;
//! assert_eq!(fast.generated, plain.generated); // lossless
//! assert!(stats.target_passes <= plain.generated.len());
//! println!("tau {:.2}, acceptance by depth {:?}", stats.tau(), stats.accept_rate_by_pos());
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

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
