//! augur-distill: the speculators that need training, trained for a model augur serves.
//!
//! - [`data`]: self-distillation data: the target's own responses to a prompt set, and optionally
//!   its final hidden states, so heads train without re-running the base model.
//! - [`medusa`]: Medusa-1 heads on the frozen target (Cai et al. 2024), trained on that data, with
//!   the held-out accuracy table that shapes their candidate tree.
//! - [`draft`]: a draft model distilled from the target (its first blocks, trained against its
//!   distribution), written as a GGUF with the target's tokenizer.
//! - [`mtp`]: DeepSeek-V3-style multi-token prediction modules on the frozen target.
//!
//! They decode through `augur_decode::speculative` (`--spec medusa:FILE`, `--spec draft:FILE`,
//! `--spec mtp:FILE`).

#![warn(missing_docs)]

pub mod data;
pub mod draft;
mod error;
pub mod medusa;
pub mod mtp;

pub use error::{Error, Result};

/// The learning-rate schedule both speculators train with: linear warm-up over the first 5% of
/// `steps`, then cosine decay to a tenth of `lr`.
pub(crate) fn schedule(lr: f64, steps: usize) -> augur_nn::optim::LrSchedule {
    augur_nn::optim::LrSchedule { base_lr: lr, min_lr: lr * 0.1, warmup: (steps / 20).max(1), total: steps }
}

/// Whether sample `i` of `n` is held out for evaluation: every 20th, when there are at least 20.
pub(crate) fn held_out(i: usize, n: usize) -> bool {
    i % 20 == 19 && n >= 20
}

/// Where training is, for a progress display.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub steps: usize,
    /// Loss of the last step.
    pub loss: f64,
}
