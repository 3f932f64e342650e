//! Speculative decoding: propose → verify in one target pass over a token tree → keep the
//! accepted path in the KV cache → record stats. Lossless: greedy output equals plain greedy
//! decoding token for token, and sampled output is distributed exactly as the target's.

mod accept;
mod drafters;
pub mod medusa;
pub mod mtp;
mod throttle;
mod tree;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use augur_kernels::matmul::ACTQ_MAX_BATCH;
use augur_models::{Logits, Model, State};

pub use accept::{accept, accept_typical, Accepted, Typical};
pub use drafters::{from_spec, Ctx, DraftModel, Drafter, EarlyExit, PromptLookup};
pub use tree::{Compiled, Tree};

use crate::generate::{check_prompt, Emitter, GenerateConfig, StopReason, Summary, TokenEvent};
use crate::rng::Rng;
use crate::sampler::Sampler;
use crate::Result;

/// Speculation settings.
#[derive(Debug, Clone)]
pub struct SpecConfig {
    /// Most draft tokens per round (tree nodes), at most 15 so a verification pass stays on the
    /// batched integer path (16 rows with the pending token). The governor adapts below it.
    pub k: usize,
    /// Typical acceptance instead of exact verification (Medusa's relaxed rule; NOT lossless:
    /// the output is no longer distributed as the target's). Applies when sampling; greedy
    /// decoding stays exact.
    pub typical: Option<Typical>,
    /// Measure each draft size's throughput and use the best (see `throttle.rs`), for drafters
    /// of a fixed tree shape (`Drafter::adaptive` false) in greedy decoding only (a seeded sampled run must repeat exactly, so timing may not steer it); off,
    /// every round drafts what the governor asks (tests of the loop's mechanics turn it off).
    pub throttle: bool,
}

impl SpecConfig {
    /// Exact (lossless) speculation with at most `k` draft nodes per round.
    pub fn new(k: usize) -> Self {
        SpecConfig { k, typical: None, throttle: true }
    }
}

/// What speculation did.
#[derive(Debug, Clone, Default)]
pub struct SpecStats {
    /// Target forward passes (verifications).
    pub target_passes: usize,
    /// Tokens emitted (accepted + bonus).
    pub emitted: usize,
    /// Draft nodes proposed.
    pub drafted: usize,
    /// Per draft depth d (index d-1): rounds that proposed a node at depth d, and rounds that
    /// accepted one.
    pub proposed_at: Vec<usize>,
    /// Per draft depth d (index d-1): rounds that accepted a node at depth d.
    pub accepted_at: Vec<usize>,
    /// Time spent drafting.
    pub draft_time: Duration,
    /// Time spent in target verification passes.
    pub target_time: Duration,
}

impl SpecStats {
    /// Mean tokens emitted per target pass.
    pub fn tau(&self) -> f64 {
        self.emitted as f64 / self.target_passes.max(1) as f64
    }

    /// Acceptance rate at each draft depth.
    pub fn accept_rate_by_pos(&self) -> Vec<f64> {
        self.proposed_at.iter().zip(&self.accepted_at).map(|(&p, &a)| a as f64 / p.max(1) as f64).collect()
    }

    fn record(&mut self, depth: usize, accepted: usize) {
        if self.proposed_at.len() < depth {
            self.proposed_at.resize(depth, 0);
            self.accepted_at.resize(depth, 0);
        }
        for d in 0..depth {
            self.proposed_at[d] += 1;
            self.accepted_at[d] += (d < accepted) as usize;
        }
    }
}

/// Sets each round's draft size from what was accepted, so speculation backs off where drafts
/// fail (open-ended text, a weak drafter) and costs at most a small probe there: the depth is one
/// past what was accepted last round (doubled after a fully accepted round), and after two
/// rounds with nothing accepted drafting pauses for 1, 2, 4 … (at most 16) rounds, then probes.
#[derive(Debug, Clone)]
pub(crate) struct Governor {
    k_max: usize,
    k: usize,
    fails: u32,
    skip: u32,
}

impl Governor {
    fn new(k_max: usize) -> Self {
        Governor { k_max, k: k_max, fails: 0, skip: 0 }
    }

    /// Draft tokens for this round (0: do not draft).
    fn next(&mut self) -> usize {
        if self.skip > 0 {
            self.skip -= 1;
            return 0;
        }
        self.k
    }

    fn update(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        if accepted == 0 {
            self.fails += 1;
            if self.fails >= 2 {
                self.skip = 1 << (self.fails - 2).min(4);
            }
        } else {
            self.fails = 0;
        }
        self.k = if accepted == proposed { 2 * proposed } else { accepted + 1 }.clamp(1, self.k_max);
    }
}

/// Generate like [`crate::generate`], drafting with `drafter` and verifying with the target.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &GenerateConfig,
    spec: &SpecConfig,
    drafter: &mut dyn Drafter,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<(Summary, SpecStats)> {
    let llama = &model.llama;
    let vocab = llama.cfg.vocab;
    let k = spec.k.clamp(1, ACTQ_MAX_BATCH - 1);
    let mut sampler = Sampler::new(cfg.sampler.clone())?;
    let mut rng = Rng::new(cfg.sampler.seed ^ 0x5EC0_DE5E_ED00_0001);
    check_prompt(model, prompt, cfg.max_tokens)?;
    let need = prompt.len() + cfg.max_tokens + k + 1;
    let mut st = State::new(&llama.cfg);
    st.activations = cfg.activations;
    st.reserve(&llama.cfg, need.min(llama.cfg.context));
    let mut tokens: Vec<u32> = prompt.to_vec();
    let mut emit = Emitter::new(cfg);
    let mut stats = SpecStats::default();
    let mut dense = Vec::new();
    let mut governor = Governor::new(k);
    let mut throttle = throttle::Throttle::new(k);
    let dim = llama.cfg.dim;
    // The hidden state of the row that chose the pending token (for drafters that read it).
    let mut hidden: Vec<f32> = Vec::with_capacity(dim);
    // The hidden states of the positions cached since the last proposal, for drafters that
    // read them all (MTP).
    let context_hidden = drafter.wants_context_hidden();
    let mut fresh: Vec<f32> = Vec::new();

    // Prefill all but the last prompt token; it becomes the first pending token.
    let t0 = Instant::now();
    if prompt.len() > 1 {
        let which = if context_hidden { Logits::Hidden } else { Logits::Last };
        llama.forward(&mut st, &prompt[..prompt.len() - 1], which)?;
        if context_hidden {
            fresh.extend_from_slice(st.hidden());
        }
    }
    let prefill = t0.elapsed();
    let t1 = Instant::now();
    let mut reason = StopReason::MaxTokens;
    'rounds: while emit.generated.len() < cfg.max_tokens {
        let room = (llama.cfg.context - st.len() - 1).min(cfg.max_tokens - emit.generated.len() - 1);
        let td = Instant::now();
        // Fixed-shape drafters (Medusa) are throttled by measured throughput; chains keep the
        // governor, which follows bursty acceptance (a span to copy) faster than running
        // averages can (prompt lookup lost 1.07x -> 1.00x on the grounded tasks throttled).
        // Timing may only steer greedy decoding: when sampling, what is drafted decides how the
        // random stream is consumed, and a seeded run must repeat exactly.
        let cap = if spec.throttle && sampler.cfg.is_greedy() && !drafter.adaptive() { throttle.next() } else { k };
        let want = if drafter.adaptive() { governor.next() } else { governor.next().min(1) * k }.min(room).min(cap);
        let tree = if want == 0 {
            Tree::default()
        } else {
            let hidden = (!hidden.is_empty()).then_some(&hidden[..]);
            let ctx = Ctx { tokens: &tokens, target: llama, state: &mut st, hidden, context_hidden: &fresh, k: want, sampler: &mut sampler };
            let tree = drafter.propose(ctx)?;
            fresh.clear();
            tree
        };
        stats.draft_time += td.elapsed();
        let compiled = tree.compile(*tokens.last().unwrap());
        let tv = Instant::now();
        let base = st.len();
        let logits = llama.forward_tree(&mut st, &compiled.tokens, &compiled.depth, &compiled.ancestors)?;
        let acc = match &spec.typical {
            Some(t) => accept_typical(&compiled, logits, vocab, &tokens, emit.generated.len(), &mut sampler, t),
            None => accept(&tree, &compiled, logits, vocab, &tokens, emit.generated.len(), &mut sampler, &mut rng, &mut dense),
        };
        let mut keep = vec![0];
        keep.extend_from_slice(&acc.rows);
        stats.target_time += tv.elapsed();
        stats.target_passes += 1;
        stats.drafted += tree.len();
        stats.record(tree.max_depth(), acc.tokens.len());
        governor.update(tree.max_depth(), acc.tokens.len());
        // Emit accepted tokens then the bonus, each with the logits row it was chosen from.
        let mut rows = vec![0];
        rows.extend_from_slice(&acc.rows);
        let emitted: Vec<u32> = acc.tokens.iter().copied().chain([acc.bonus]).collect();
        let logits_rows: Vec<Vec<f32>> = rows.iter().map(|&r| logits[r * vocab..(r + 1) * vocab].to_vec()).collect();
        let last = *rows.last().expect("row 0");
        hidden.clear();
        hidden.extend_from_slice(&st.hidden()[last * dim..(last + 1) * dim]);
        if context_hidden {
            for &r in &keep {
                fresh.extend_from_slice(&st.hidden()[r * dim..(r + 1) * dim]);
            }
        }
        st.keep(base, &keep);
        throttle.record(emitted.len(), td.elapsed().as_secs_f64());
        for (tok, row_logits) in emitted.into_iter().zip(&logits_rows) {
            tokens.push(tok);
            stats.emitted += 1;
            match emit.push(&model.tokenizer, tok, row_logits, &mut on_token)? {
                Some(r) => {
                    reason = r;
                    break 'rounds;
                }
                None if emit.generated.len() == cfg.max_tokens => break 'rounds,
                None => {}
            }
        }
    }
    let decode = t1.elapsed();
    Ok((emit.finish(prompt.len(), prefill, decode, reason), stats))
}

#[cfg(test)]
mod tests {
    use super::Governor;

    #[test]
    fn governor_backs_off_and_probes_again() {
        let mut g = Governor::new(6);
        assert_eq!(g.next(), 6);
        g.update(6, 6);
        assert_eq!(g.next(), 6, "capped at k_max");
        g.update(6, 2);
        assert_eq!(g.next(), 3);
        g.update(3, 0);
        assert_eq!(g.next(), 1);
        g.update(1, 0);
        // two failures: skip one round, then probe
        assert_eq!(g.next(), 0);
        assert_eq!(g.next(), 1);
        g.update(1, 0);
        assert_eq!((g.next(), g.next()), (0, 0));
        assert_eq!(g.next(), 1);
        g.update(1, 1);
        assert_eq!(g.next(), 2);
        g.update(2, 2);
        assert_eq!(g.next(), 4);
    }
}
