//! Training MTP modules (DeepSeek-V3's multi-token prediction) on the frozen target.
//!
//! Module `d` reads the previous depth's hidden state at position `i` (the target's cached
//! final-norm state for `d = 1`) and the embedding of token `i + d`, runs one block over the
//! sample's positions, and is trained with the cross-entropy of token `i + d + 1` through the
//! target's final norm and head (frozen, restricted to the data's most frequent tokens); the
//! loss is the mean over depths. Each block starts as the target's last block with its residual
//! branches zeroed (see [`MtpModules::init`]). Only response targets count; every 20th sample is held out to
//! measure each depth's top-1 accuracy with the true tokens as inputs, before and after training.

use augur_core::{no_grad, Tensor};
use augur_decode::sampler::argmax;
use augur_decode::speculative::mtp::MtpModules;
use augur_formats::gguf::Gguf;
use augur_models::{qk_rows_from_gguf, Model};
use augur_nn::{Module, Rng};

use crate::data::{DistillSet, Sample};
use crate::draft::gguf_name;
use crate::medusa::{draft_vocab, vocab_index, IGNORE};
use crate::{Error, Progress, Result};

/// How to train the modules.
#[derive(Debug, Clone)]
pub struct MtpConfig {
    /// Modules (draft depth).
    pub depth: usize,
    /// Size of the reduced vocabulary the head scores.
    pub vocab: usize,
    /// Passes over the training samples.
    pub epochs: usize,
    /// Peak AdamW learning rate (linear warm-up, cosine decay).
    pub lr: f64,
    /// Tokens of each sample used.
    pub max_len: usize,
    /// Samples per optimizer step.
    pub accumulate: usize,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Where the modules train (`None`: the CPU); they come back to the host when done.
    pub device: Option<augur_core::Device>,
}

impl Default for MtpConfig {
    fn default() -> Self {
        MtpConfig { depth: 1, vocab: 8192, epochs: 1, lr: 5e-4, max_len: 256, accumulate: 4, seed: 1, device: None }
    }
}

/// Trained modules and what was measured about them.
pub struct Trained {
    /// The modules, ready to save.
    pub modules: MtpModules,
    /// Held-out top-1 accuracy per depth before training (the target's last block as it is).
    pub before: Vec<f64>,
    /// The same after training.
    pub after: Vec<f64>,
    /// Training and held-out samples.
    pub samples: (usize, usize),
}

/// One sample's inputs: ids cut to the training length, its target hidden states, and where
/// its response starts.
struct Item {
    ids: Vec<u32>,
    h0: Vec<f32>,
    prompt_len: usize,
}

/// Per depth, the mean cross-entropy over the sample's scored targets (as a graph when
/// gradients are on) and (hits, scored) of the top-1 guess.
fn forward(m: &MtpModules, target: &Model, index: &[u32], it: &Item, dev: Option<&augur_core::Device>) -> Result<Vec<(Tensor, usize, usize)>> {
    let (t, dim) = (it.ids.len(), target.llama.cfg.dim);
    let mut h = Tensor::from_vec(it.h0.clone(), &[1, t, dim])?.to(dev)?;
    let mut out = Vec::new();
    for (d, module) in m.modules.iter().enumerate() {
        let depth = d + 1;
        // Row i reads token i + depth and predicts i + depth + 1; rows past the sample read a
        // padding token (causal attention keeps them from touching earlier rows) and score none.
        let toks: Vec<u32> = (0..t).map(|i| it.ids.get(i + depth).copied().unwrap_or(0)).collect();
        let targets: Vec<u32> = (0..t)
            .map(|i| match it.ids.get(i + depth + 1) {
                Some(&id) if i + depth + 1 >= it.prompt_len => index[id as usize],
                _ => IGNORE,
            })
            .collect();
        let emb = Tensor::from_vec(target.llama.embedding_rows(&toks)?, &[1, t, dim])?.to(dev)?;
        h = module.forward(&h, &emb, &m.pos, None)?;
        let logits = m.logits(&h)?.reshape(&[t, m.vocab.len()])?;
        let scored = targets.iter().filter(|&&x| x != IGNORE).count();
        if scored == 0 {
            continue;
        }
        let v = logits.detach().to_vec_f32()?;
        let width = m.vocab.len();
        let hits = v
            .chunks_exact(width)
            .zip(&targets)
            .filter(|(row, &tg)| tg != IGNORE && argmax(row) == tg)
            .count();
        out.push((logits.cross_entropy(&targets, Some(IGNORE))?, hits, scored));
    }
    Ok(out)
}

fn accuracy(m: &MtpModules, target: &Model, index: &[u32], items: &[Item], dev: Option<&augur_core::Device>) -> Result<Vec<f64>> {
    let mut acc = vec![(0usize, 0usize); m.depth()];
    for it in items {
        for (d, (_, hits, n)) in no_grad(|| forward(m, target, index, it, dev))?.into_iter().enumerate() {
            acc[d].0 += hits;
            acc[d].1 += n;
        }
    }
    Ok(acc.iter().map(|&(h, n)| h as f64 / n.max(1) as f64).collect())
}

/// Train `cfg.depth` modules for `target` on `set` (which must carry hidden states; see
/// [`crate::data::hidden_states`]). `progress` is called after every optimizer step.
pub fn train(target: &Model, set: &DistillSet, cfg: &MtpConfig, mut progress: impl FnMut(Progress)) -> Result<Trained> {
    let c = &target.llama.cfg;
    let dim = c.dim;
    let hidden = match &set.hidden {
        Some(h) if set.dim == dim => h,
        _ => return Err(Error::Invalid(format!("the data carries no hidden states of width {dim}; compute them first (`augur distill-data --hidden`)"))),
    };
    if cfg.depth == 0 || cfg.epochs == 0 || cfg.accumulate == 0 || cfg.vocab == 0 || cfg.max_len < cfg.depth + 2 {
        return Err(Error::Invalid("depth, epochs, accumulate and vocab must be at least 1, max_len at least depth + 2".into()));
    }
    let vocab = draft_vocab(&set.samples, c.vocab, cfg.vocab);
    let index = vocab_index(&vocab, c.vocab);
    // Each block starts as the target's last one.
    let g = Gguf::open(&target.path).map_err(|e| Error::Invalid(format!("MTP training reads the target's GGUF file: {e}")))?;
    let last = c.n_layer - 1;
    let load = |name: &str| -> augur_decode::Result<Tensor> {
        let full = format!("blocks.{last}.{}", name);
        let bad = |e: String| augur_decode::Error::Spec(format!("MTP block from the target's `{full}`: {e}"));
        let (gname, heads) = gguf_name(&full, c.n_head, c.n_kv_head).ok_or_else(|| bad("no such tensor".into()))?;
        let src = g.tensor(&gname).map_err(|e| bad(e.to_string()))?;
        let mut v = src.to_vec_f32().map_err(|e| bad(e.to_string()))?;
        if let (Some(h), true) = (heads, c.rope_interleaved) {
            v = qk_rows_from_gguf(&v, h, dim);
        }
        Ok(Tensor::from_vec(v, src.shape())?)
    };
    let mut modules = MtpModules::init(&target.llama, cfg.depth, vocab, load)?;
    modules.visit("", &mut |_, t| *t = t.detach().requires_grad(true));
    let dev = cfg.device.as_ref();
    augur_nn::ModuleExt::to_device(&mut modules, dev)?;

    let offsets = set.offsets();
    let item = |i: usize, s: &Sample| {
        let t = s.ids.len().min(cfg.max_len).min(c.context);
        (t > cfg.depth + 1 && s.prompt_len < t).then(|| {
            let h0 = hidden[offsets[i] * dim..(offsets[i] + t) * dim].iter().map(|v| v.to_f32()).collect();
            Item { ids: s.ids[..t].to_vec(), h0, prompt_len: s.prompt_len }
        })
    };
    let (mut train_set, eval_set) = crate::split(&set.samples, item);
    if train_set.is_empty() {
        return Err(Error::Invalid(format!("no sample has response tokens within its first {} tokens; raise --max-len", cfg.max_len)));
    }
    let before = accuracy(&modules, target, &index, &eval_set, dev)?;

    let l = crate::Loop { epochs: cfg.epochs, group: cfg.accumulate, lr: cfg.lr, betas: (0.9, 0.95) };
    crate::train_loop(&mut train_set, &mut modules, &mut Rng::new(cfg.seed), l, |modules, group| {
        let mut total = 0f64;
        for it in group {
            let per_depth = forward(modules, target, &index, it, dev)?;
            let n = per_depth.len().max(1) as f64;
            let mut loss: Option<Tensor> = None;
            for (l, _, _) in per_depth {
                total += l.item()? as f64 / n;
                let l = l.scale(1.0 / (n * group.len() as f64))?;
                loss = Some(match loss {
                    None => l,
                    Some(acc) => acc.add(&l)?,
                });
            }
            if let Some(loss) = loss {
                loss.backward()?;
            }
        }
        Ok(total / group.len() as f64)
    }, &mut progress)?;
    let after = accuracy(&modules, target, &index, &eval_set, dev)?;
    let samples = (train_set.len(), eval_set.len());
    // The drafter decodes on the host.
    augur_nn::ModuleExt::to_device(&mut modules, None)?;
    Ok(Trained { modules, before, after, samples })
}
