//! augur-distill: the speculators that need training, trained for a model augur serves.
//!
//! - [`data`]: self-distillation data: the target's own responses to a prompt set, and optionally
//!   its final hidden states, so heads train without re-running the base model.
//! - [`medusa`]: Medusa-1 heads on the frozen target (Cai et al. 2024), trained on that data, with
//!   the held-out accuracy table that shapes their candidate tree.
//!
//! The heads decode through `augur_decode::speculative` (`--spec medusa:FILE`).

#![warn(missing_docs)]

pub mod data;
mod error;
pub mod medusa;

pub use error::{Error, Result};
