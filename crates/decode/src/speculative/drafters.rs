//! Drafters: where candidate tokens come from.
//!
//! - [`PromptLookup`]: n-gram retrieval from the prompt and the text generated so far.
//! - [`DraftModel`]: a smaller model with the same tokenizer, its own KV cache kept in step.
//! - [`EarlyExit`]: the target's own first layers, final norm and head (self-speculation).

use augur_models::{Llama, Logits, Model, State};

use super::tree::Tree;
use crate::sampler::Sampler;
use crate::{Error, Result};

/// What a drafter sees when proposing.
pub struct Ctx<'a> {
    /// Every accepted token; the last one (the pending token) is not in the target's cache yet.
    pub tokens: &'a [u32],
    /// The target and its state (holding `tokens[..len - 1]`).
    pub target: &'a Llama,
    /// The target's run state (cache of `tokens[..len - 1]`); a drafter may append past it but must
    /// truncate back.
    pub state: &'a mut State,
    /// The target's final-norm hidden state at the row whose logits chose the pending token
    /// (`None` on the first round, whose pending token is the prompt's last).
    pub hidden: Option<&'a [f32]>,
    /// The target's final-norm hidden states of the positions it cached since the last
    /// proposal (the prompt's on the first), `[positions, dim]`, for drafters that ask for them
    /// ([`Drafter::wants_context_hidden`]; empty otherwise).
    pub context_hidden: &'a [f32],
    /// Most nodes wanted.
    pub k: usize,
    /// The sampler, whose filtered distribution sampled drafts must use.
    pub sampler: &'a mut Sampler,
}

/// A source of candidate trees.
pub trait Drafter {
    /// Propose a tree of at most `ctx.k` nodes continuing `ctx.tokens` (may be empty).
    fn propose(&mut self, ctx: Ctx) -> Result<Tree>;

    /// Whether the loop may shrink `k` after failed rounds (chains); a drafter with a fixed tree
    /// shape (Medusa) answers false and is only paused after repeated failures.
    fn adaptive(&self) -> bool {
        true
    }

    /// Whether to be given the hidden state of every position the target caches
    /// ([`Ctx::context_hidden`]), which costs the loop a copy per kept row.
    fn wants_context_hidden(&self) -> bool {
        false
    }
}

/// The drafter a `--spec` value names: `prompt-lookup` (n-grams up to `ngram` tokens, `width`
/// branches), `draft:PATH` (a model with `target`'s vocabulary), `early-exit:L` or
/// `medusa:PATH` (heads from `augur train-medusa`, a tree of at most `k` nodes) or `mtp:PATH`
/// (modules from `augur train-mtp`, a chain).
pub fn from_spec(spec: &str, target: &Model, ngram: usize, width: usize, k: usize) -> Result<Box<dyn Drafter + Send>> {
    let n_layer = target.llama.cfg.n_layer;
    Ok(match spec.split_once(':') {
        None if spec == "prompt-lookup" => Box::new(PromptLookup::new(ngram, width)),
        Some(("draft", path)) => {
            let draft = Model::open(std::path::Path::new(path))?;
            Box::new(DraftModel::new(draft, target)?)
        }
        Some(("medusa", path)) => {
            let heads = super::medusa::MedusaHeads::open(std::path::Path::new(path), &target.llama)?;
            Box::new(super::medusa::Medusa::new(heads, k))
        }
        Some(("mtp", path)) => {
            let modules = super::mtp::MtpModules::open(std::path::Path::new(path), &target.llama)?;
            Box::new(super::mtp::Mtp::new(modules))
        }
        Some(("early-exit", l)) => match l.parse::<usize>() {
            Ok(layers) if layers >= 1 && layers < n_layer => Box::new(EarlyExit { layers }),
            _ => return Err(Error::Spec(format!("early-exit:{l}: the layer count must be a number in 1..{} (the model has {n_layer} layers)", n_layer - 1))),
        },
        _ => return Err(Error::Spec(format!("unknown --spec `{spec}`: use prompt-lookup, draft:PATH, early-exit:L, medusa:PATH or mtp:PATH"))),
    })
}

/// N-gram lookup: the longest suffix of the context (up to `max_n` tokens, down to
/// [`PromptLookup::MIN_N`]) that also occurs earlier; the tokens that followed its most recent
/// occurrences are proposed, as a chain per distinct continuation (up to `width` branches, each
/// no longer than the match).
pub struct PromptLookup {
    max_n: usize,
    width: usize,
}

impl PromptLookup {
    /// Shortest match that proposes anything. A single shared token predicts poorly: on the
    /// input-grounded tasks of `bench/tasks` (8-token matches at most, k = 6, throttled) tau went
    /// 1.88 → 2.06 without one-token matches, and 1.93 without two-token ones (BENCHMARKS.md).
    pub const MIN_N: usize = 2;

    /// Default longest match: on the same tasks tau rose with it up to 8 tokens (k = 8, no
    /// throttle: 1.74 at 3, 1.89 at 5, 1.94 at 8, no further at 12 or 24).
    pub const DEFAULT_MAX_N: usize = 8;

    /// Match n-grams of up to `max_n` tokens; propose up to `width` branches.
    pub fn new(max_n: usize, width: usize) -> Self {
        PromptLookup { max_n: max_n.max(Self::MIN_N), width: width.max(1) }
    }

    /// The branches proposed after `t` with a budget of `k` tokens: the continuations that
    /// followed the most recent occurrences of the longest matching suffix, each as long as the
    /// match and what is left of the budget allow (the most recent first; splitting the budget
    /// evenly cut tau from 2.04 to 1.60 with two branches on the grounded tasks, this way 2.08).
    fn branches<'a>(&self, t: &'a [u32], k: usize) -> Vec<&'a [u32]> {
        let mut branches: Vec<&[u32]> = Vec::new();
        for n in (Self::MIN_N..=self.max_n.min(t.len().saturating_sub(1))).rev() {
            let suffix = &t[t.len() - n..];
            let mut used = 0;
            // most recent match first
            for start in (0..t.len() - n).rev() {
                if &t[start..start + n] != suffix {
                    continue;
                }
                // A match of n tokens vouches for at most n more: longer drafts after short
                // matches were mostly rejected (grounded tasks: 1.37-1.40x → 1.43-1.46x).
                let cont = &t[start + n..(start + n + n.min(k - used)).min(t.len())];
                if cont.is_empty() || branches.iter().any(|b| b[0] == cont[0]) {
                    continue;
                }
                used += cont.len();
                branches.push(cont);
                if branches.len() == self.width || used == k {
                    break;
                }
            }
            if !branches.is_empty() {
                break;
            }
        }
        branches
    }
}

impl Drafter for PromptLookup {
    fn propose(&mut self, ctx: Ctx) -> Result<Tree> {
        let mut tree = Tree::default();
        for branch in self.branches(ctx.tokens, ctx.k) {
            let mut parent = None;
            for &tok in branch {
                parent = Some(tree.push(tok, parent, None));
            }
        }
        Ok(tree)
    }
}

/// Keeps a drafting state in step with the accepted tokens: drops what diverged, feeds what is
/// missing (all but the pending token), so each round drafts from the right context.
struct Synced {
    state: State,
    fed: Vec<u32>,
}

impl Synced {
    fn sync(&mut self, llama: &Llama, tokens: &[u32]) -> Result<()> {
        let common = self.fed.iter().zip(tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        self.state.truncate(common);
        self.fed.truncate(common);
        let missing = &tokens[common..tokens.len() - 1];
        if !missing.is_empty() {
            llama.forward(&mut self.state, missing, Logits::Last)?;
            self.fed.extend_from_slice(missing);
        }
        Ok(())
    }
}

/// Draft `k` tokens one at a time from `step`'s logits: greedy proposals are deterministic;
/// sampled ones carry the draft's filtered distribution for the rejection test.
fn draft_chain(k: usize, pending: u32, sampler: &mut Sampler, mut step: impl FnMut(u32) -> Result<Vec<f32>>) -> Result<Tree> {
    let mut tree = Tree::default();
    let mut last = pending;
    for i in 0..k {
        let logits = step(last)?;
        let (tok, q) = if sampler.cfg.is_greedy() {
            (sampler.distribution(&logits, &[])[0].0, None)
        } else {
            let dist = sampler.distribution(&logits, &[]).to_vec();
            (sampler.draw(&dist), Some(dist))
        };
        tree.push(tok, i.checked_sub(1), q);
        last = tok;
    }
    Ok(tree)
}

/// A smaller model with the target's tokenizer.
pub struct DraftModel {
    model: Model,
    synced: Synced,
}

impl DraftModel {
    /// Wrap `draft` for `target`, refusing a different vocabulary.
    pub fn new(draft: Model, target: &Model) -> Result<Self> {
        let (a, b) = (&draft.tokenizer, &target.tokenizer);
        let same = a.vocab_size() == b.vocab_size() && (0..a.vocab_size() as u32).all(|i| a.id_to_token(i) == b.id_to_token(i));
        if !same || draft.llama.cfg.vocab != target.llama.cfg.vocab {
            return Err(Error::Sampling(format!(
                "draft model {} does not share the target's vocabulary ({} vs {} tokens, or different token strings); a draft model must use the same tokenizer",
                draft.path.display(),
                a.vocab_size(),
                b.vocab_size()
            )));
        }
        let state = State::new(&draft.llama.cfg);
        Ok(DraftModel { model: draft, synced: Synced { state, fed: Vec::new() } })
    }
}

impl Drafter for DraftModel {
    fn propose(&mut self, ctx: Ctx) -> Result<Tree> {
        let k = ctx.k;
        let llama = &self.model.llama;
        self.synced.sync(llama, ctx.tokens)?;
        let base = self.synced.state.len();
        let state = &mut self.synced.state;
        let tree = draft_chain(k, *ctx.tokens.last().unwrap(), ctx.sampler, |tok| Ok(llama.forward(state, &[tok], Logits::Last)?.to_vec()))?;
        // Only the accepted prefix of the fed tokens stays valid; sync() trims the rest next round.
        self.synced.fed.push(*ctx.tokens.last().unwrap());
        self.synced.fed.extend_from_slice(&tree.tokens[..tree.len().saturating_sub(1)]);
        debug_assert_eq!(self.synced.fed.len(), base + tree.len());
        Ok(tree)
    }
}

/// Self-speculation: the target's first `layers` blocks, then its final norm and head. The KV
/// entries of those layers for the accepted context are the target's own; drafted positions are
/// written past them and dropped before verification.
pub struct EarlyExit {
    /// How many of the target's layers draft.
    pub layers: usize,
}

impl Drafter for EarlyExit {
    fn propose(&mut self, ctx: Ctx) -> Result<Tree> {
        let base = ctx.state.len();
        let (target, state) = (ctx.target, ctx.state);
        let tree = draft_chain(ctx.k, *ctx.tokens.last().unwrap(), ctx.sampler, |tok| {
            Ok(target.forward_early_exit(state, &[tok], self.layers)?.to_vec())
        });
        state.truncate(base);
        tree
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_takes_the_longest_match_and_drafts_no_further_than_it() {
        // "1 2 3 9" then "5 2 3 7 8" occur; the context ends in "1 2 3": the 3-token match wins
        // over the more recent 2-token one ("2 3" → 7), and proposes 3 tokens at most.
        let t = [1, 2, 3, 9, 10, 11, 12, 5, 2, 3, 7, 8, 1, 2, 3];
        let d = PromptLookup::new(8, 1);
        assert_eq!(d.branches(&t, 6), vec![&[9u32, 10, 11][..]]);
        // Budget smaller than the match.
        assert_eq!(d.branches(&t, 2), vec![&[9u32, 10][..]]);
        // Only a one-token match: nothing.
        assert!(d.branches(&[4, 5, 6, 4], 6).is_empty());
        // Two distinct continuations of the same 2-token suffix as a tree of two branches, the
        // most recent first; a repeated continuation is not proposed twice.
        let t = [1, 2, 5, 6, 1, 2, 7, 8, 1, 2, 7, 9, 1, 2];
        assert_eq!(PromptLookup::new(8, 3).branches(&t, 6), vec![&[7u32, 9][..], &[5u32, 6][..]]);
        // The most recent continuation takes what its match allows, the next one the rest.
        let t = [1, 2, 3, 4, 5, 6, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(PromptLookup::new(8, 2).branches(&t, 4), vec![&[7u32, 8, 9][..], &[4u32][..]]);
    }
}
