//! One generation as a step-by-step object, for engines that decode several sequences per
//! forward pass (continuous batching): prefill with [`Sequence::start`], then feed
//! [`Sequence::next_input`] to a batched step and hand its logits row to [`Sequence::advance`].
//! Same sampling, stop and streaming rules as [`crate::generate`], and the same numbers.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use augur_models::{Logits, Model, State};

use crate::generate::{check_prompt, Emitter, GenerateConfig, StopReason, Summary, TokenEvent};
use crate::sampler::Sampler;
use crate::Result;

/// One sequence generated step by step by an outside loop (the server's continuous batching):
/// its prompt is prefilled on its own, then each decode step of the batch adds one token to it.
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
    pub fn start(model: &Model, prompt: &[u32], cfg: &GenerateConfig, on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>) -> Result<Self> {
        Self::resume(model, State::new(&model.llama.cfg), 0, prompt, cfg, on_token)
    }

    /// [`Sequence::start`] from a state whose cache already holds `prompt[..keep]` (a session's
    /// earlier turns); only the rest of the prompt is computed.
    pub fn resume(
        model: &Model,
        mut state: State,
        keep: usize,
        prompt: &[u32],
        cfg: &GenerateConfig,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<Self> {
        let llama = &model.llama;
        let sampler = Sampler::new(cfg.sampler.clone())?;
        check_prompt(model, prompt, cfg.max_tokens)?;
        let need = prompt.len() + cfg.max_tokens;
        // Never keep the last prompt token: it gets its own step, as in speculative decoding (where
        // it is the first pending token), so all paths compute every position with the same kernels.
        let keep = keep.min(prompt.len() - 1).min(state.len());
        state.truncate(keep);
        state.activations = cfg.activations;
        state.reserve(&llama.cfg, need);
        let t0 = Instant::now();
        let (head, last) = prompt.split_at(prompt.len() - 1);
        if head.len() > keep {
            llama.forward(&mut state, &head[keep..], Logits::Last)?;
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

    /// Why this sequence ended, once it has.
    pub fn finished(&self) -> Option<StopReason> {
        self.stop
    }

    /// Take the logits row of the last step: sample, emit, and say whether the sequence ended.
    pub fn advance(&mut self, model: &Model, logits: &[f32], on_token: &mut impl FnMut(&TokenEvent) -> ControlFlow<()>) -> Result<Option<StopReason>> {
        let Sequence { sampler, emit, history, pending, stop, max_tokens, .. } = self;
        choose(Picker { sampler, emit, history, pending, stop, max_tokens: *max_tokens }, model, logits, on_token)
    }

    /// One decode step on this sequence alone: feed the pending token, then choose the next
    /// (without copying the logits).
    pub fn step(&mut self, model: &Model, on_token: &mut impl FnMut(&TokenEvent) -> ControlFlow<()>) -> Result<Option<StopReason>> {
        let Some(tok) = self.next_input() else { return Ok(self.stop) };
        let Sequence { state, sampler, emit, history, pending, stop, max_tokens, .. } = self;
        let logits = model.llama.forward(state, &[tok], Logits::Last)?;
        choose(Picker { sampler, emit, history, pending, stop, max_tokens: *max_tokens }, model, logits, on_token)
    }

    /// The summary, and the state (for a session to continue from).
    pub fn finish_with_state(self) -> (Summary, State) {
        let decode = self.started.elapsed();
        let stop = self.stop.unwrap_or(StopReason::MaxTokens);
        (self.emit.finish(self.prompt_tokens, self.prefill, decode, stop), self.state)
    }

    /// The counts and timings of the finished sequence.
    pub fn finish(self) -> Summary {
        self.finish_with_state().0
    }
}

/// The fields that choosing a token touches (borrowed apart from the state that holds the logits).
struct Picker<'a> {
    sampler: &'a mut Sampler,
    emit: &'a mut Emitter,
    history: &'a mut Vec<u32>,
    pending: &'a mut Option<u32>,
    stop: &'a mut Option<StopReason>,
    max_tokens: usize,
}

/// Sample from `logits`, emit the token, and record whether the sequence ended.
fn choose(p: Picker, model: &Model, logits: &[f32], on_token: &mut impl FnMut(&TokenEvent) -> ControlFlow<()>) -> Result<Option<StopReason>> {
    let id = p.sampler.sample_with(logits, p.history, p.emit.generated.len());
    p.history.push(id);
    *p.pending = Some(id);
    if let Some(r) = p.emit.push(&model.tokenizer, id, logits, on_token)? {
        *p.stop = Some(r);
    } else if p.emit.generated.len() == p.max_tokens {
        *p.stop = Some(StopReason::MaxTokens);
    }
    Ok(*p.stop)
}
