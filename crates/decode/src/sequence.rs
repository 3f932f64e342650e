//! One generation as a step-by-step object, for engines that decode several sequences per
//! forward pass (continuous batching): prefill with [`Sequence::start`], then feed
//! [`Sequence::next_input`] to a batched step and hand its logits row to [`Sequence::advance`].
//! Same sampling, stop and streaming rules as [`crate::generate`], and the same numbers.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use augur_models::{Logits, Model, State};

use crate::generate::{Emitter, GenerateConfig, StopReason, Summary, TokenEvent};
use crate::sampler::Sampler;
use crate::Result;

pub struct Sequence {
    /// The sequence's KV cache.
    pub state: State,
    sampler: Sampler,
    emit: Emitter,
    history: Vec<u32>,
    max_tokens: usize,
    prompt_tokens: usize,
    /// The last sampled token, not yet in the cache.
    pending: Option<u32>,
    stop: Option<StopReason>,
    prefill: Duration,
    started: Instant,
}

impl Sequence {
    /// Prefill `prompt`, then sample and emit the first token.
    pub fn start(model: &Model, prompt: &[u32], cfg: &GenerateConfig, mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>) -> Result<Self> {
        let llama = &model.llama;
        if prompt.is_empty() {
            return Err(augur_models::Error::Config("the prompt is empty: give at least one token".into()).into());
        }
        let sampler = Sampler::new(cfg.sampler.clone())?;
        let need = prompt.len() + cfg.max_tokens;
        if need > llama.cfg.context {
            return Err(augur_models::Error::ContextFull { need, ctx: llama.cfg.context }.into());
        }
        let mut state = State::new(&llama.cfg);
        state.activations = cfg.activations;
        state.reserve(&llama.cfg, need);
        let t0 = Instant::now();
        let (head, last) = prompt.split_at(prompt.len() - 1);
        if !head.is_empty() {
            llama.forward(&mut state, head, Logits::Last)?;
        }
        let logits = llama.forward(&mut state, last, Logits::Last)?.to_vec();
        let mut seq = Sequence {
            state,
            sampler,
            emit: Emitter::new(cfg),
            history: prompt.to_vec(),
            max_tokens: cfg.max_tokens,
            prompt_tokens: prompt.len(),
            pending: None,
            stop: None,
            prefill: t0.elapsed(),
            started: Instant::now(),
        };
        if cfg.max_tokens == 0 {
            seq.stop = Some(StopReason::MaxTokens);
        } else {
            seq.advance(model, &logits, &mut on_token)?;
        }
        Ok(seq)
    }

    /// The token the next step must feed, or None once the sequence has finished.
    pub fn next_input(&self) -> Option<u32> {
        if self.stop.is_some() {
            None
        } else {
            self.pending
        }
    }

    pub fn finished(&self) -> Option<StopReason> {
        self.stop
    }

    /// Take the logits row of the last step: sample, emit, and say whether the sequence ended.
    pub fn advance(&mut self, model: &Model, logits: &[f32], on_token: &mut impl FnMut(&TokenEvent) -> ControlFlow<()>) -> Result<Option<StopReason>> {
        let generated = self.emit.generated.len();
        let id = self.sampler.sample_with(logits, &self.history, generated);
        self.history.push(id);
        self.pending = Some(id);
        if let Some(r) = self.emit.push(&model.tokenizer, id, logits, on_token)? {
            self.stop = Some(r);
        } else if self.emit.generated.len() == self.max_tokens {
            self.stop = Some(StopReason::MaxTokens);
        }
        Ok(self.stop)
    }

    pub fn finish(self) -> Summary {
        let decode = self.started.elapsed();
        self.emit.finish(self.prompt_tokens, self.prefill, decode, self.stop.unwrap_or(StopReason::MaxTokens))
    }
}
