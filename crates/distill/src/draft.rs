//! A distilled draft model: the target's first `layers` blocks, with its embedding and output
//! head shared and frozen, trained to match the target's next-token distribution on the
//! self-distillation data (the loss is the cross-entropy against the target's own softmax, i.e.
//! KL(target ‖ draft) plus the target's entropy; the target's logits are computed as training
//! goes). Starting from the target's own blocks, the draft begins as early-exit self-speculation
//! and learns to predict what the whole model would say. It is written as a GGUF that carries
//! the target's tokenizer, so `--spec draft:FILE` uses it like any draft model.
//!
//! Only response positions train and count (drafting happens there; the prompt, a shared
//! system prompt included, is context). Every 20th sample is held out: the KL divergence and the
//! top-1 agreement with the target on it are measured before and after training.

use std::path::Path;

use augur_core::{no_grad, QuantType, Tensor};
use augur_formats::gguf::Gguf;
use augur_models::{qk_rows_from_gguf, qk_rows_to_gguf, write_truncated_gguf_with, Activations, Logits, Model, State};
use augur_nn::gpt::Gpt;
use augur_decode::sampler::argmax;
use augur_nn::{Module, Rng};

use crate::data::DistillSet;
use crate::{Error, Progress, Result};

/// How to distil the draft model.
#[derive(Debug, Clone)]
pub struct DraftConfig {
    /// Blocks the draft keeps (the target's first ones).
    pub layers: usize,
    /// Passes over the training samples.
    pub epochs: usize,
    /// Peak AdamW learning rate (linear warm-up, cosine decay).
    pub lr: f64,
    /// Tokens of each sample used (longer samples are cut; those whose response starts past it
    /// are skipped).
    pub max_len: usize,
    /// Samples per optimizer step.
    pub accumulate: usize,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Where the draft trains (`None`: the host). The target's forward passes run wherever its
    /// model was loaded.
    pub device: Option<augur_core::Device>,
}

impl Default for DraftConfig {
    fn default() -> Self {
        DraftConfig { layers: 4, epochs: 1, lr: 2e-4, max_len: 256, accumulate: 4, seed: 1, device: None }
    }
}

/// Held-out agreement between draft and target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evaluation {
    /// Mean KL(target ‖ draft) per position, in nats.
    pub kl: f64,
    /// Share of positions where the draft's most likely token is the target's.
    pub agreement: f64,
    /// Positions measured.
    pub positions: usize,
}

/// The trained draft and what was measured.
pub struct Trained {
    /// The draft model (the target's embedding, final norm as trained, `layers` blocks).
    pub gpt: Gpt,
    /// Held out, before training (the target's first blocks as they are).
    pub before: Evaluation,
    /// Held out, after training.
    pub after: Evaluation,
    /// Response positions trained on per epoch.
    pub train_positions: usize,
}

/// GGUF name of a draft parameter, and the heads to un-permute for (q/k rows).
pub(crate) fn gguf_name(name: &str, n_head: usize, n_kv_head: usize) -> Option<(String, Option<usize>)> {
    match name {
        "tok_emb.weight" => return Some(("token_embd.weight".into(), None)),
        "norm_f.weight" => return Some(("output_norm.weight".into(), None)),
        "head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = name.strip_prefix("blocks.")?;
    let (i, part) = rest.split_once('.')?;
    let (g, heads) = match part {
        "norm1.weight" => ("attn_norm", None),
        "attn.wq.weight" => ("attn_q", Some(n_head)),
        "attn.wk.weight" => ("attn_k", Some(n_kv_head)),
        "attn.wv.weight" => ("attn_v", None),
        "attn.wo.weight" => ("attn_output", None),
        "norm2.weight" => ("ffn_norm", None),
        "mlp.gate.weight" => ("ffn_gate", None),
        "mlp.up.weight" => ("ffn_up", None),
        "mlp.down.weight" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{i}.{g}.weight"), heads))
}

/// The draft before training: the target's first `layers` blocks as f32, its embedding (and
/// head) frozen.
pub fn from_target(target: &Model, layers: usize) -> Result<Gpt> {
    let c = &target.llama.cfg;
    if layers == 0 || layers > c.n_layer {
        return Err(Error::Invalid(format!("a draft of {layers} blocks from a target of {}", c.n_layer)));
    }
    let gc = augur_decode::speculative::mtp::gpt_config(c, layers)?;
    let g = Gguf::open(&target.path).map_err(|e| Error::Invalid(format!("draft distillation reads the target's GGUF file: {e}")))?;
    let mut gpt = Gpt::new(gc)?;
    let mut failure: Option<Error> = None;
    let interleaved = c.rope_interleaved;
    gpt.visit("", &mut |name, t| {
        if failure.is_some() {
            return;
        }
        let load = || -> Result<Tensor> {
            let (gname, heads) = gguf_name(name, c.n_head, c.n_kv_head).ok_or_else(|| Error::Invalid(format!("no target tensor for draft parameter `{name}`")))?;
            let src = g.tensor(&gname)?;
            let shape = src.shape().to_vec();
            let mut v = src.to_vec_f32()?;
            if let (Some(h), true) = (heads, interleaved) {
                v = qk_rows_from_gguf(&v, h, c.dim);
            }
            let frozen = matches!(name, "tok_emb.weight" | "head.weight");
            Ok(Tensor::from_vec(v, &shape)?.requires_grad(!frozen))
        };
        match load() {
            Ok(new) if new.shape() == t.shape() => *t = new,
            Ok(new) => failure = Some(Error::Invalid(format!("`{name}`: the target has {:?}, the draft {:?}", new.shape(), t.shape()))),
            Err(e) => failure = Some(e),
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(gpt),
    }
}

/// A sample cut to the training length, and the first position whose next token is part of
/// the response (where drafting happens; earlier rows are context only).
struct Cut {
    ids: Vec<u32>,
    from: usize,
}

/// Cross-entropy of the draft against the target's softmax on the response rows of `s` (soft
/// labels), with the target's entropy and the rows where their argmaxes agree, all per row. The
/// soft labels are computed where the draft is.
fn soft_loss(gpt: &Gpt, target: &Model, st: &mut State, s: &Cut) -> Result<(Tensor, f64, usize)> {
    let (v, ids, n) = (target.llama.cfg.vocab, &s.ids, s.ids.len());
    let rows = n - s.from;
    st.truncate(0);
    let p = target.llama.forward(st, ids, Logits::All)?.to_vec();
    let z = gpt.forward(ids, 1, None)?.reshape(&[n, v])?;
    let dev = z.device();
    let zs = z.detach().to_vec_f32()?;
    let agree = p.chunks_exact(v).zip(zs.chunks_exact(v)).skip(s.from).filter(|(a, b)| argmax(a) == argmax(b)).count();
    // The target's softmax on the response rows (zero on the context rows) and its entropy.
    let (pt, entropy) = no_grad(|| -> Result<(Tensor, f64)> {
        let mask: Vec<f32> = (0..n).map(|i| if i < s.from { 0.0 } else { 1.0 }).collect();
        let logp = Tensor::from_vec(p, &[n, v])?.to(dev.as_ref())?.log_softmax_last()?;
        let pt = logp.exp()?.mul(&Tensor::from_vec(mask, &[n, 1])?.to(dev.as_ref())?)?;
        let entropy = -pt.mul(&logp)?.sum_all()?.item()? as f64;
        Ok((pt, entropy))
    })?;
    let loss = z.log_softmax_last()?.mul(&pt)?.sum_all()?.scale(-1.0 / rows as f64)?;
    Ok((loss, entropy / rows as f64, agree))
}

fn evaluate(gpt: &Gpt, target: &Model, st: &mut State, samples: &[Cut]) -> Result<Evaluation> {
    let (mut kl, mut agree, mut n) = (0f64, 0usize, 0usize);
    for s in samples {
        let rows = s.ids.len() - s.from;
        let (loss, entropy, a) = no_grad(|| soft_loss(gpt, target, st, s))?;
        kl += (loss.item()? as f64 - entropy) * rows as f64;
        agree += a;
        n += rows;
    }
    Ok(Evaluation { kl: kl / n.max(1) as f64, agreement: agree as f64 / n.max(1) as f64, positions: n })
}

/// Distil a draft of `cfg.layers` blocks for `target` on `set` (responses only; hidden states
/// are not needed). `progress` is called after every optimizer step.
pub fn train(target: &Model, set: &DistillSet, cfg: &DraftConfig, mut progress: impl FnMut(Progress)) -> Result<Trained> {
    if cfg.epochs == 0 || cfg.accumulate == 0 || cfg.max_len < 2 {
        return Err(Error::Invalid("epochs and accumulate must be at least 1, max_len at least 2".into()));
    }
    // Each sample up to max_len tokens; only those whose response starts inside that train.
    let cut = |s: &crate::data::Sample| {
        let ids = s.ids[..s.ids.len().min(cfg.max_len).min(target.llama.cfg.context)].to_vec();
        let from = s.prompt_len.saturating_sub(1);
        (from < ids.len()).then_some(Cut { ids, from })
    };
    let (mut train_set, eval_set) = crate::split(&set.samples, |_, s| cut(s));
    if train_set.is_empty() {
        return Err(Error::Invalid(format!("no sample has response tokens within its first {} tokens; raise --max-len", cfg.max_len)));
    }
    let mut gpt = from_target(target, cfg.layers)?;
    augur_nn::ModuleExt::to_device(&mut gpt, cfg.device.as_ref())?;
    let mut st = State::new(&target.llama.cfg);
    st.activations = Activations::F32;
    let before = evaluate(&gpt, target, &mut st, &eval_set)?;

    let l = crate::Loop { epochs: cfg.epochs, group: cfg.accumulate, lr: cfg.lr, betas: (0.9, 0.95) };
    crate::train_loop(&mut train_set, &mut gpt, &mut Rng::new(cfg.seed), l, |gpt, group| {
        let mut total = 0f64;
        for sample in group {
            let (loss, entropy, _) = soft_loss(gpt, target, &mut st, sample)?;
            total += loss.item()? as f64 - entropy;
            loss.scale(1.0 / group.len() as f64)?.backward()?;
        }
        Ok(total / group.len() as f64)
    }, &mut progress)?;
    let after = evaluate(&gpt, target, &mut st, &eval_set)?;
    augur_nn::ModuleExt::to_device(&mut gpt, None)?;
    Ok(Trained { gpt, before, after, train_positions: train_set.iter().map(|s| s.ids.len() - s.from).sum() })
}

/// Write the draft as a GGUF beside the target's tokenizer and metadata: the target's
/// embedding (and head), the trained blocks and final norm in Q8_0 (q/k rows back in the GGUF
/// order).
pub fn write_gguf(target: &Model, gpt: &mut Gpt, out: &Path) -> Result<()> {
    let c = &target.llama.cfg;
    let mut tensors = std::collections::HashMap::new();
    let mut failure: Option<Error> = None;
    gpt.visit("", &mut |name, t| {
        if failure.is_some() || matches!(name, "tok_emb.weight" | "head.weight") {
            return;
        }
        let Some((gname, heads)) = gguf_name(name, c.n_head, c.n_kv_head) else { return };
        let write = || -> Result<Tensor> {
            let mut v = t.to_vec_f32()?;
            if let (Some(h), true) = (heads, c.rope_interleaved) {
                v = qk_rows_to_gguf(&v, h, c.dim);
            }
            let shape = t.shape().to_vec();
            if shape.len() == 2 && shape[1] % 32 == 0 {
                let bytes: Vec<u8> = v.chunks(shape[1]).flat_map(|r| QuantType::Q8_0.quantize_row(r)).collect();
                return Ok(Tensor::from_raw(augur_core::DType::Quant(QuantType::Q8_0), augur_core::Bytes::from_vec(bytes), &shape)?);
            }
            Ok(Tensor::from_vec(v, &shape)?)
        };
        match write() {
            Ok(w) => {
                tensors.insert(gname, w);
            }
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let layers = gpt.config.n_layer;
    write_truncated_gguf_with(&target.path, out, layers, &|name| tensors.get(name).cloned())?;
    Ok(())
}
