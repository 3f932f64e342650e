//! Training Medusa-1 heads on the frozen target (Cai et al. 2024).
//!
//! Head `k` (0-based) reads the target's final hidden state at position `t` and predicts the
//! token at `t + k + 2` (the target's own head predicts `t + 1`). Each head is `layers` residual
//! SiLU blocks (weights zero-initialised, so a fresh head repeats the target's next-token guess)
//! followed by the target's output head, shared and frozen, restricted to the `vocab` most
//! frequent tokens of the data. The loss is `Σ_k decay^k · CE_k`. Only response positions train
//! (the heads draft during generation); every 20th sample is held out to measure each head's
//! top-r accuracy, which decides the candidate tree at decoding time.

use augur_core::{no_grad, Tensor};
use augur_decode::speculative::medusa::ResBlock;
use augur_models::Llama;
use augur_nn::layers::Linear;
use augur_nn::module::join;
use augur_nn::{Module, Rng};

use crate::data::{DistillSet, Sample};
pub use crate::Progress;
use crate::{Error, Result};

/// How to train the heads.
#[derive(Debug, Clone)]
pub struct MedusaConfig {
    /// Number of heads (draft depth).
    pub heads: usize,
    /// Residual blocks per head.
    pub layers: usize,
    /// Size of the reduced vocabulary the heads score.
    pub vocab: usize,
    /// Passes over the training positions.
    pub epochs: usize,
    /// Positions per step.
    pub batch: usize,
    /// Peak AdamW learning rate (linear warm-up, cosine decay).
    pub lr: f64,
    /// Loss weight of head `k` is `decay^k` (Medusa's lambda).
    pub decay: f64,
    /// Ranks per head in the accuracy table.
    pub ranks: usize,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Where the heads train (`None`: the CPU); the hidden states go there batch by batch.
    pub device: Option<augur_core::Device>,
}

impl Default for MedusaConfig {
    fn default() -> Self {
        MedusaConfig { heads: 3, layers: 1, vocab: 8192, epochs: 2, batch: 256, lr: 1e-3, decay: 0.8, ranks: 8, seed: 1, device: None }
    }
}

/// Trained heads and what was measured about them.
#[derive(Debug, Clone)]
pub struct Trained {
    /// Per head, its blocks.
    pub heads: Vec<Vec<ResBlock>>,
    /// The reduced vocabulary (token ids, most frequent first).
    pub vocab: Vec<u32>,
    /// `accuracy[k][r]`: held-out share of positions where head `k`'s rank-`r` candidate was right.
    pub accuracy: Vec<Vec<f32>>,
    /// Share of training targets inside the reduced vocabulary.
    pub coverage: f64,
    /// Training and held-out positions.
    pub positions: (usize, usize),
}

/// The `size` most frequent tokens of the samples (responses and prompts), most frequent first.
pub fn draft_vocab(samples: &[Sample], vocab: usize, size: usize) -> Vec<u32> {
    let mut count = vec![0u64; vocab];
    for s in samples {
        for &id in &s.ids {
            if let Some(c) = count.get_mut(id as usize) {
                *c += 1;
            }
        }
    }
    let mut ids: Vec<u32> = (0..vocab as u32).filter(|&i| count[i as usize] > 0).collect();
    ids.sort_by_key(|&i| (std::cmp::Reverse(count[i as usize]), i));
    ids.truncate(size);
    ids
}

/// The trainable part: `blocks[k][l]` is block `l` of head `k`, named `medusa.{k}.{l}`.
struct Heads {
    blocks: Vec<Vec<Linear>>,
}

impl Module for Heads {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (k, head) in self.blocks.iter_mut().enumerate() {
            for (l, b) in head.iter_mut().enumerate() {
                b.visit(&join(prefix, &format!("medusa.{k}.{l}")), f);
            }
        }
    }
}

impl Heads {
    /// Logits over the reduced vocabulary of every head, each `[rows, vocab]`.
    fn forward(&self, h: &Tensor, head_w: &Tensor) -> Result<Vec<Tensor>> {
        self.blocks
            .iter()
            .map(|head| {
                let mut x = h.clone();
                for b in head {
                    x = x.add(&b.forward(&x)?.silu()?)?;
                }
                Ok(x.linear(head_w)?)
            })
            .collect()
    }
}

/// Marks a target the heads cannot score (outside the reduced vocabulary or past the sample).
pub(crate) const IGNORE: u32 = u32::MAX;

/// Each of `vocab` token ids' position in the reduced vocabulary `ids`, or [`IGNORE`].
pub(crate) fn vocab_index(ids: &[u32], vocab: usize) -> Vec<u32> {
    let mut index = vec![IGNORE; vocab];
    for (i, &id) in ids.iter().enumerate() {
        index[id as usize] = i as u32;
    }
    index
}

/// Positions `t` that train (response positions whose next token exists) as global token indices,
/// with their sample.
fn positions(set: &DistillSet, keep: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let offsets = set.offsets();
    let mut out = Vec::new();
    for (i, s) in set.samples.iter().enumerate().filter(|(i, _)| keep(*i)) {
        for t in s.prompt_len - 1..s.ids.len().saturating_sub(1) {
            out.push((i, offsets[i] + t));
        }
    }
    out
}

struct Batch {
    h: Tensor,
    /// Per head, the reduced-vocabulary index of the target (or [`IGNORE`]).
    targets: Vec<Vec<u32>>,
}

fn batch(set: &DistillSet, offsets: &[usize], index: &[u32], heads: usize, pos: &[(usize, usize)], dev: Option<&augur_core::Device>) -> Result<Batch> {
    let (dim, hidden) = (set.dim, set.hidden.as_ref().expect("checked by train"));
    let mut h = Vec::with_capacity(pos.len() * dim);
    let mut targets = vec![Vec::with_capacity(pos.len()); heads];
    for &(s, g) in pos {
        h.extend(hidden[g * dim..(g + 1) * dim].iter().map(|v| v.to_f32()));
        let (ids, t) = (&set.samples[s].ids, g - offsets[s]);
        for (k, tk) in targets.iter_mut().enumerate() {
            tk.push(ids.get(t + k + 2).map_or(IGNORE, |&id| index.get(id as usize).copied().unwrap_or(IGNORE)));
        }
    }
    Ok(Batch { h: Tensor::from_vec(h, &[pos.len(), dim])?.to(dev)?, targets })
}

/// Train heads for `target` on `set` (which must carry hidden states; see
/// [`crate::data::hidden_states`]). `progress` is called after every step.
pub fn train(target: &Llama, set: &DistillSet, cfg: &MedusaConfig, mut progress: impl FnMut(Progress)) -> Result<Trained> {
    let dim = target.cfg.dim;
    if set.hidden.is_none() || set.dim != dim {
        return Err(Error::Invalid(format!("the data carries no hidden states of width {dim}; compute them first (`augur distill-data --hidden`)")));
    }
    if cfg.heads == 0 || cfg.layers == 0 || cfg.vocab == 0 || cfg.batch == 0 || cfg.ranks == 0 {
        return Err(Error::Invalid("heads, layers, vocab, batch and ranks must all be at least 1".into()));
    }
    let vocab = draft_vocab(&set.samples, target.cfg.vocab, cfg.vocab);
    let index = vocab_index(&vocab, target.cfg.vocab);
    let dev = cfg.device.as_ref();
    let head_w = Tensor::from_vec(target.output_rows(&vocab)?, &[vocab.len(), dim])?.to(dev)?;
    let offsets = set.offsets();
    let held_out = |i: usize| crate::held_out(i, set.samples.len());
    let mut train_pos = positions(set, |i| !held_out(i));
    let eval_pos = positions(set, held_out);
    if train_pos.is_empty() {
        return Err(Error::Invalid("no response tokens to train on".into()));
    }
    let (mut hits, mut total) = (0usize, 0usize);
    for k in 0..cfg.heads {
        for &(s, g) in &train_pos {
            if let Some(&id) = set.samples[s].ids.get(g - offsets[s] + k + 2) {
                total += 1;
                hits += (index[id as usize] != IGNORE) as usize;
            }
        }
    }
    let coverage = hits as f64 / total.max(1) as f64;

    let mut rng = Rng::new(cfg.seed);
    let mut heads = Heads { blocks: (0..cfg.heads).map(|_| (0..cfg.layers).map(|_| Linear::new(dim, dim, true, 0.0, &mut rng)).collect()).collect() };
    augur_nn::ModuleExt::to_device(&mut heads, dev)?;
    let l = crate::Loop { epochs: cfg.epochs, group: cfg.batch, lr: cfg.lr, betas: (0.9, 0.999) };
    crate::train_loop(&mut train_pos, &mut heads, &mut rng, l, |heads, chunk| {
        let b = batch(set, &offsets, &index, cfg.heads, chunk, dev)?;
        let logits = heads.forward(&b.h, &head_w)?;
        let mut loss: Option<Tensor> = None;
        for (k, (l, t)) in logits.iter().zip(&b.targets).enumerate() {
            let lk = l.cross_entropy(t, Some(IGNORE))?.scale(cfg.decay.powi(k as i32))?;
            loss = Some(match loss {
                None => lk,
                Some(acc) => acc.add(&lk)?,
            });
        }
        let loss = loss.expect("at least one head");
        loss.backward()?;
        Ok(loss.item()? as f64)
    }, &mut progress)?;

    let accuracy = no_grad(|| accuracy(&heads, &head_w, set, &offsets, &index, &eval_pos, cfg))?;
    let heads_out = heads
        .blocks
        .iter()
        .map(|head| head.iter().map(|b| Ok(ResBlock { weight: b.weight.to_vec_f32()?, bias: b.bias.as_ref().expect("built with bias").to_vec_f32()? })).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    Ok(Trained { heads: heads_out, vocab, accuracy, coverage, positions: (train_pos.len(), eval_pos.len()) })
}

/// Held-out top-r accuracy of each head (a target outside the reduced vocabulary is a miss).
fn accuracy(heads: &Heads, head_w: &Tensor, set: &DistillSet, offsets: &[usize], index: &[u32], pos: &[(usize, usize)], cfg: &MedusaConfig) -> Result<Vec<Vec<f32>>> {
    let mut hits = vec![vec![0usize; cfg.ranks]; cfg.heads];
    let mut total = vec![0usize; cfg.heads];
    for chunk in pos.chunks(cfg.batch) {
        let b = batch(set, offsets, index, cfg.heads, chunk, cfg.device.as_ref())?;
        for (k, l) in heads.forward(&b.h, head_w)?.iter().enumerate() {
            let v = l.to_vec_f32()?;
            let width = v.len() / chunk.len();
            for (i, row) in v.chunks_exact(width).enumerate() {
                let (s, g) = chunk[i];
                if set.samples[s].ids.get(g - offsets[s] + k + 2).is_none() {
                    continue;
                }
                total[k] += 1;
                let t = b.targets[k][i];
                if t == IGNORE {
                    continue;
                }
                let above = row.iter().filter(|&&x| x > row[t as usize]).count();
                if above < cfg.ranks {
                    hits[k][above] += 1;
                }
            }
        }
    }
    Ok(hits.iter().zip(&total).map(|(h, &n)| h.iter().map(|&x| x as f32 / n.max(1) as f32).collect()).collect())
}
