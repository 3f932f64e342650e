//! augur-formats: reading and writing model files.
//!
//! - [`gguf`]: GGUF v2/v3 reader (mmap, every metadata type, hostile-input checks) and writer.
//! - [`safetensors`]: safetensors checkpoints (single file or sharded), mmapped.
//! - [`tokenizer`]: a tokenizer built from GGUF metadata or from `tokenizer.json`.

#![warn(missing_docs)]

mod error;
pub mod gguf;
pub mod safetensors;
pub mod tokenizer;

pub use error::{Error, Result};
