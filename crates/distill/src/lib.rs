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

/// The learning-rate schedule the speculators train with: linear warm-up over the first 5% of
/// `steps`, then cosine decay to a tenth of `lr`.
fn schedule(lr: f64, steps: usize) -> augur_nn::optim::LrSchedule {
    augur_nn::optim::LrSchedule { base_lr: lr, min_lr: lr * 0.1, warmup: (steps / 20).max(1), total: steps }
}

/// Whether sample `i` of `n` is held out for evaluation: every 20th, when there are at least 20.
pub(crate) fn held_out(i: usize, n: usize) -> bool {
    i % 20 == 19 && n >= 20
}

/// `samples` mapped by `f` (which may drop a sample), split into (training, held out) by
/// [`held_out`].
pub(crate) fn split<S, T>(samples: &[S], f: impl Fn(usize, &S) -> Option<T>) -> (Vec<T>, Vec<T>) {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, s) in samples.iter().enumerate() {
        if let Some(t) = f(i, s) {
            if held_out(i, samples.len()) { &mut eval } else { &mut train }.push(t);
        }
    }
    (train, eval)
}

/// How a trainer's optimisation loop runs.
pub(crate) struct Loop {
    /// Passes over the items.
    pub epochs: usize,
    /// Items per optimizer step.
    pub group: usize,
    /// Peak learning rate ([`schedule`]).
    pub lr: f64,
    /// AdamW's betas.
    pub betas: (f64, f64),
}

/// The loop every trainer here runs: `l.epochs` passes over `items`, each shuffled by `rng`,
/// `l.group` items per AdamW step (no weight decay) with the learning rate of [`schedule`].
/// `step` computes a group's loss, runs its backward pass and returns the loss to report;
/// `progress` sees every step.
pub(crate) fn train_loop<T, M: augur_nn::Module>(
    items: &mut [T],
    model: &mut M,
    rng: &mut augur_nn::Rng,
    l: Loop,
    mut step: impl FnMut(&M, &[T]) -> Result<f64>,
    mut progress: impl FnMut(Progress),
) -> Result<()> {
    use augur_nn::optim::Optimizer;
    use augur_nn::ModuleExt;
    let mut opt = augur_nn::optim::AdamW::new(l.lr, l.betas, 1e-8, 0.0);
    let steps = items.len().div_ceil(l.group) * l.epochs;
    let sched = schedule(l.lr, steps);
    let mut done = 0;
    for _ in 0..l.epochs {
        rng.shuffle(items);
        for group in items.chunks(l.group) {
            let loss = step(model, group)?;
            opt.set_lr(sched.at(done));
            opt.step(model)?;
            model.zero_grad();
            done += 1;
            progress(Progress { step: done, steps, loss });
        }
    }
    Ok(())
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
