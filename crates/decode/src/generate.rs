//! The generation loop: prefill the prompt in one batched pass, then decode a token at a time,
//! streaming each token to a callback, until EOS, a stop string, the token budget or the callback
//! says stop.

use std::ops::ControlFlow;
use std::time::Duration;

use augur_formats::tokenizer::{StreamDecoder, Tokenizer};
use augur_models::{Activations, Model, State};

use crate::sequence::Sequence;

use crate::sampler::SamplerConfig;
use crate::stop::StopMatcher;
use crate::Result;

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct GenerateConfig {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampler: SamplerConfig,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
    /// Representation of matmul inputs (see `augur_models::Activations`).
    pub activations: Activations,
    /// The callback reads ids and text only, never [`TokenEvent::logits`]: greedy decoding (no
    /// penalties) of a model on a CUDA device then takes each step's argmax on the device and
    /// hands the callback empty logits, which on an H200 runs about 2.5x faster than copying every
    /// step's logits to the host. No effect on the CPU.
    pub ids_only: bool,
}

/// One generated token, handed to the callback.
pub struct TokenEvent<'a> {
    /// 0-based index among the generated tokens.
    pub pos: usize,
    /// The token id.
    pub id: u32,
    /// Text this token completes for the user (may be empty: partial UTF-8, or held back because it
    /// may start a stop string).
    pub text: &'a str,
    /// The raw logits this token was chosen from (empty when [`GenerateConfig::ids_only`]
    /// kept them on the device).
    pub logits: &'a [f32],
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The text reached one of the stop strings.
    StopString,
    /// The token budget ran out.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose keys/values were reused from the session instead of computed.
    pub cached_tokens: usize,
    /// Generated token ids (without the prompt).
    pub generated: Vec<u32>,
    /// Generated text (stop strings cut off).
    pub text: String,
    /// Time spent on the prompt.
    pub prefill: Duration,
    /// Time spent generating after the first token.
    pub decode: Duration,
    /// Why generation ended.
    pub stop: StopReason,
}

impl Summary {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first (which the prefill produced) over the decode time.
    pub fn decode_tok_per_s(&self) -> f64 {
        self.generated.len().saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Turns generated ids into the user's text: streaming UTF-8 pieces, EOS, stop strings and the
/// callback. Shared by plain and speculative generation.
pub(crate) struct Emitter {
    stream: StreamDecoder,
    stops: StopMatcher,
    text: String,
    pub generated: Vec<u32>,
    ignore_eos: bool,
}

impl Emitter {
    pub fn new(cfg: &GenerateConfig) -> Self {
        Emitter {
            stream: StreamDecoder::new(),
            stops: StopMatcher::new(&cfg.stop),
            text: String::new(),
            generated: Vec::with_capacity(cfg.max_tokens),
            ignore_eos: cfg.ignore_eos,
        }
    }

    /// Record token `id` (chosen from `logits`); `Some(reason)` when generation must stop.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        logits: &[f32],
        on_token: &mut impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<Option<StopReason>> {
        let pos = self.generated.len();
        self.generated.push(id);
        let is_eos = tok.is_eos(id) && !self.ignore_eos;
        let piece = if is_eos { String::new() } else { self.stream.push(tok, id)? };
        let (piece, hit_stop) = self.stops.push(&piece);
        self.text.push_str(&piece);
        let flow = on_token(&TokenEvent { pos, id, text: &piece, logits });
        Ok(if is_eos {
            Some(StopReason::Eos)
        } else if hit_stop {
            Some(StopReason::StopString)
        } else if flow.is_break() {
            Some(StopReason::Callback)
        } else {
            None
        })
    }

    pub fn finish(mut self, prompt_tokens: usize, prefill: Duration, decode: Duration, stop: StopReason) -> Summary {
        if stop != StopReason::StopString {
            self.text.push_str(&self.stops.flush());
        }
        Summary { prompt_tokens, cached_tokens: 0, generated: self.generated, text: self.text, prefill, decode, stop }
    }
}

/// A non-empty prompt that leaves room for `max_tokens` in the context.
pub(crate) fn check_prompt(model: &Model, prompt: &[u32], max_tokens: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(augur_models::Error::Config("the prompt is empty: give at least one token".into()).into());
    }
    let (need, ctx) = (prompt.len() + max_tokens, model.llama.cfg.context);
    if need > ctx {
        return Err(augur_models::Error::ContextFull { need, ctx }.into());
    }
    Ok(())
}

/// The run state of a conversation: the KV cache and the tokens it holds. Reusing one across
/// turns skips recomputing the shared prefix (the earlier turns) of the next prompt.
pub struct Session {
    state: State,
    cached: Vec<u32>,
}

impl Session {
    /// An empty session for `model`.
    pub fn new(model: &Model) -> Self {
        Session { state: State::new(&model.llama.cfg), cached: Vec::new() }
    }
}

/// Generate from `prompt` token ids. `on_token` sees every token; returning `Break` stops.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &GenerateConfig,
    on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Summary> {
    generate_in(&mut Session::new(model), model, prompt, cfg, on_token)
}

/// [`generate`] continuing a [`Session`]: the longest prefix of `prompt` already in the session's
/// cache is kept, the rest is computed. (Positions computed in a different batch may differ from
/// a fresh run's in the last bits.)
pub fn generate_in(
    session: &mut Session,
    model: &Model,
    prompt: &[u32],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Summary> {
    let same_precision = session.state.activations == cfg.activations;
    let keep = if same_precision { session.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count() } else { 0 };
    if cfg.ids_only && cfg.max_tokens > 0 && cfg.sampler.is_greedy() && !cfg.sampler.penalizes() {
        if let Some(summary) = greedy_on_device(session, model, prompt, cfg, keep, &mut on_token)? {
            return Ok(summary);
        }
    }
    let state = std::mem::replace(&mut session.state, State::new(&model.llama.cfg));
    session.cached.clear();
    let mut seq = Sequence::resume(model, state, keep, prompt, cfg, &mut on_token)?;
    let kept = keep.min(prompt.len().saturating_sub(1));
    while seq.next_input().is_some() {
        seq.step(model, &mut on_token)?;
    }
    let (mut summary, state) = seq.finish_with_state();
    // The cache now holds the prompt and every generated token but the last.
    session.cached.extend_from_slice(prompt);
    session.cached.extend_from_slice(&summary.generated[..summary.generated.len().saturating_sub(1)]);
    session.state = state;
    summary.cached_tokens = kept;
    Ok(summary)
}

/// [`generate_in`] for greedy decoding with the argmax on the device
/// ([`augur_models::Llama::greedy_on_device`]); `None` on the CPU. The same prefix reuse and
/// stops as step-by-step decoding; the callback sees empty logits.
fn greedy_on_device(
    session: &mut Session,
    model: &Model,
    prompt: &[u32],
    cfg: &GenerateConfig,
    keep: usize,
    on_token: &mut impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Option<Summary>> {
    if model.llama.device_name().is_none() {
        return Ok(None);
    }
    check_prompt(model, prompt, cfg.max_tokens)?;
    // As in `Sequence::resume`: the last prompt token is always computed, as the first step.
    let keep = keep.min(prompt.len() - 1).min(session.state.len());
    session.state.truncate(keep);
    // Recorded as on the CPU path, so the next turn's prefix reuse sees the same precision.
    session.state.activations = cfg.activations;
    session.cached.clear();
    let mut emit = Emitter::new(cfg);
    let mut outcome: Result<Option<StopReason>> = Ok(None);
    let mut go = |id: u32| {
        outcome = emit.push(&model.tokenizer, id, &[], on_token);
        matches!(outcome, Ok(None)) && emit.generated.len() < cfg.max_tokens
    };
    let Some((prefill, decode)) = model.llama.greedy_on_device(&mut session.state, &prompt[keep..], cfg.max_tokens, &mut go)? else {
        return Ok(None);
    };
    let stop = outcome?.unwrap_or(StopReason::MaxTokens);
    let mut summary = emit.finish(prompt.len(), prefill, decode, stop);
    session.cached.extend_from_slice(prompt);
    session.cached.extend_from_slice(&summary.generated[..summary.generated.len().saturating_sub(1)]);
    summary.cached_tokens = keep;
    Ok(Some(summary))
}
