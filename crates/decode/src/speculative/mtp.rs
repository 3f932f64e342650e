//! MTP drafting: DeepSeek-V3-style multi-token prediction modules on a frozen target.
//!
//! Module `d` (1-based) at position `i` combines the previous depth's hidden state (the
//! target's final-norm hidden state for `d = 1`) with the embedding of token `i + d`:
//! `x = W_h · RMSNorm(h) + W_e · RMSNorm(emb)` (DeepSeek's projection of the concatenation,
//! kept as its two halves), runs one Llama block over the positions (causal attention with its
//! own KV cache), and predicts token `i + d + 1` through the target's final norm and output head
//! (shared, frozen; restricted to a reduced vocabulary). Drafting chains the modules: module 1 at
//! the last position gives the first draft token, module 2 takes module 1's state and that
//! token, and so on.
//!
//! Each module's cache holds the positions whose inputs are all accepted tokens (they never
//! change); the few positions that read a draft token run on a copy of the cache each round.
//!
//! File format (safetensors, f32): `mtp.{d}.norm_h.weight`, `mtp.{d}.norm_e.weight` `[dim]`,
//! `mtp.{d}.proj_h.weight`, `mtp.{d}.proj_e.weight` `[dim, dim]`, `mtp.{d}.block.*` (a Llama
//! block in `augur_nn::gpt` names, q/k rows in rotate-half order) and `mtp.vocab` (token ids).

use std::path::Path;

use augur_core::{no_grad, Tensor};
use augur_models::{Config, Llama, RopeScaling};
use augur_nn::functional::KvCache;
use augur_nn::gpt::{Block, GptConfig, MlpKind, NormKind};
use augur_nn::layers::{Linear, RmsNorm};
use augur_nn::module::join;
use augur_nn::posenc::{PosKind, PositionalEncoding, Rope, RopeScaling as NnRopeScaling};
use augur_nn::{Module, Rng};

use super::drafters::{Ctx, Drafter};
use super::tree::Tree;
use crate::sampler::argmax;
use crate::{Error, Result};

/// The `augur_nn` description of `layers` blocks shaped like `cfg`'s (Llama blocks: RMSNorm,
/// RoPE in rotate-half order, SwiGLU, no biases).
pub fn gpt_config(cfg: &Config, layers: usize) -> Result<GptConfig> {
    if cfg.arch == "qwen2" {
        return Err(Error::Spec("trained drafters cover llama-family targets without attention biases; qwen2 is not supported yet".into()));
    }
    let rope_scaling = match cfg.rope_scaling {
        RopeScaling::None => NnRopeScaling::None,
        RopeScaling::Linear { factor } => NnRopeScaling::Linear { factor: factor as f64 },
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => NnRopeScaling::Llama3 {
            factor: factor as f64,
            low_freq_factor: low_freq_factor as f64,
            high_freq_factor: high_freq_factor as f64,
            original_len: original_context as usize,
        },
    };
    let gc = GptConfig {
        vocab: cfg.vocab,
        dim: cfg.dim,
        n_layer: layers,
        n_head: cfg.n_head,
        n_kv_head: cfg.n_kv_head,
        hidden: cfg.hidden,
        max_seq: cfg.context,
        pos: PosKind::Rope,
        rope_theta: cfg.rope_theta as f64,
        rope_scaling,
        norm: NormKind::Rms,
        mlp: MlpKind::Swiglu,
        bias: false,
        tied: cfg.tied_embeddings,
        dropout: 0.0,
        norm_eps: cfg.rms_eps as f64,
        init_std: 0.02,
        seed: 0,
    };
    if gc.head_dim() != cfg.head_dim {
        return Err(Error::Spec(format!("head width {} is not width / heads ({})", cfg.head_dim, gc.head_dim())));
    }
    Ok(gc)
}

/// One MTP module.
#[derive(Debug)]
pub struct MtpModule {
    /// RMSNorm of the previous depth's hidden state.
    pub norm_h: RmsNorm,
    /// RMSNorm of the next token's embedding.
    pub norm_e: RmsNorm,
    /// The hidden-state half of the projection, `[dim, dim]`.
    pub proj_h: Linear,
    /// The embedding half of the projection, `[dim, dim]`.
    pub proj_e: Linear,
    /// The transformer block.
    pub block: Block,
}

impl MtpModule {
    /// `[1, s, dim]` states from `[1, s, dim]` previous-depth states and next-token embeddings,
    /// at positions after `cache`'s (which grows).
    pub fn forward(&self, h: &Tensor, emb: &Tensor, pos: &PositionalEncoding, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let x = self.proj_h.forward(&self.norm_h.forward(h)?)?.add(&self.proj_e.forward(&self.norm_e.forward(emb)?)?)?;
        Ok(self.block.forward(&x, pos, None, cache)?)
    }
}

impl Module for MtpModule {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.norm_h.visit(&join(prefix, "norm_h"), f);
        self.norm_e.visit(&join(prefix, "norm_e"), f);
        self.proj_h.visit(&join(prefix, "proj_h"), f);
        self.proj_e.visit(&join(prefix, "proj_e"), f);
        self.block.visit(&join(prefix, "block"), f);
    }
}

/// The modules of one target, with what they share with it.
#[derive(Debug)]
pub struct MtpModules {
    /// Module `d` is `modules[d - 1]`.
    pub modules: Vec<MtpModule>,
    /// RoPE as the target's.
    pub pos: PositionalEncoding,
    /// Token ids the head scores.
    pub vocab: Vec<u32>,
    /// The target's output rows of `vocab`, `[vocab.len(), dim]` (frozen).
    pub head: Tensor,
    /// The target's final norm, `[dim]` (frozen).
    pub norm_f: Tensor,
    eps: f64,
}

impl Module for MtpModules {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (d, m) in self.modules.iter_mut().enumerate() {
            m.visit(&join(prefix, &format!("mtp.{}", d + 1)), f);
        }
    }
}

impl MtpModules {
    /// `depth` fresh modules for `target` over the reduced vocabulary `vocab`: the projection
    /// passes the hidden state through (`W_h = I`, `W_e = 0`) and each block starts as the
    /// target's last block with its two residual branches' output projections (`wo`, `down`)
    /// zeroed, so an untrained module passes its input through and the branches learn from zero
    /// (on SmolLM2, 3 epochs: held-out top-1 0.40 this way, 0.30 with the block as it is).
    pub fn init(target: &Llama, depth: usize, vocab: Vec<u32>, last_block: impl Fn(&str) -> Result<Tensor>) -> Result<Self> {
        let mut m = Self::empty(target, depth, vocab)?;
        let dim = target.cfg.dim;
        let eye: Vec<f32> = (0..dim * dim).map(|i| if i / dim == i % dim { 1.0 } else { 0.0 }).collect();
        for module in &mut m.modules {
            module.proj_h.weight = Tensor::from_vec(eye.clone(), &[dim, dim])?;
            module.proj_e.weight = Tensor::zeros(&[dim, dim]);
            let mut failure = None;
            module.block.visit("", &mut |name, t| {
                if matches!(name, "attn.wo.weight" | "mlp.down.weight") {
                    *t = Tensor::zeros(t.shape());
                    return;
                }
                if failure.is_none() {
                    match last_block(name) {
                        Ok(v) if v.shape() == t.shape() => *t = v,
                        Ok(v) => failure = Some(Error::Spec(format!("`{name}`: the target's block has {:?}, the module {:?}", v.shape(), t.shape()))),
                        Err(e) => failure = Some(e),
                    }
                }
            });
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(m)
    }

    fn empty(target: &Llama, depth: usize, vocab: Vec<u32>) -> Result<Self> {
        if depth == 0 {
            return Err(Error::Spec("MTP: at least one module is needed".into()));
        }
        if vocab.is_empty() {
            return Err(Error::Spec("MTP: the reduced vocabulary is empty".into()));
        }
        let c = &target.cfg;
        let gc = gpt_config(c, 1)?;
        let dim = c.dim;
        let mut rng = Rng::new(0);
        let modules = (0..depth)
            .map(|_| MtpModule {
                norm_h: RmsNorm::new(dim, c.rms_eps as f64),
                norm_e: RmsNorm::new(dim, c.rms_eps as f64),
                proj_h: Linear::new(dim, dim, false, 0.0, &mut rng),
                proj_e: Linear::new(dim, dim, false, 0.0, &mut rng),
                block: Block::new(&gc, 0, &mut rng),
            })
            .collect();
        let rope = Rope { dim: c.head_dim, theta: gc.rope_theta, scaling: gc.rope_scaling, interleaved: false };
        let pos = PositionalEncoding::new(PosKind::Rope, dim, c.n_head, c.head_dim, c.context, rope, &mut rng);
        let head = Tensor::from_vec(target.output_rows(&vocab)?, &[vocab.len(), dim])?;
        let norm_f = Tensor::from_vec(target.output_norm().to_vec(), &[dim])?;
        Ok(MtpModules { modules, pos, vocab, head, norm_f, eps: c.rms_eps as f64 })
    }

    /// Load modules written by `augur train-mtp` for `target`.
    pub fn open(path: &Path, target: &Llama) -> Result<Self> {
        let ck = augur_formats::safetensors::Checkpoint::open(path).map_err(|e| Error::Spec(format!("MTP modules: {e}")))?;
        let mut depth = 0;
        while ck.contains(&format!("mtp.{}.proj_h.weight", depth + 1)) {
            depth += 1;
        }
        if depth == 0 {
            return Err(Error::Spec(format!("{}: no `mtp.1.proj_h.weight`: not an MTP modules file (write one with `augur train-mtp`)", path.display())));
        }
        let get = |name: &str| ck.get(name).map_err(|e| Error::Spec(format!("{}: {e}", path.display())));
        let vocab: Vec<u32> = get("mtp.vocab")?.to_vec_f32()?.into_iter().map(|v| v as u32).collect();
        let mut m = Self::empty(target, depth, vocab)?;
        let mut failure = None;
        m.visit("", &mut |name, t| {
            if failure.is_none() {
                match get(name) {
                    Ok(v) if v.shape() == t.shape() => *t = v,
                    Ok(v) => failure = Some(Error::Spec(format!("{}: `{name}` has shape {:?}, the target implies {:?}", path.display(), v.shape(), t.shape()))),
                    Err(e) => failure = Some(e),
                }
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }

    /// Write the modules (and the reduced vocabulary) to `path`.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        self.visit("", &mut |name, t| out.push((name.to_string(), t.detach())));
        let n = self.vocab.len();
        out.push(("mtp.vocab".into(), Tensor::from_vec(self.vocab.iter().map(|&v| v as f32).collect(), &[n])?));
        let refs: Vec<(&str, &Tensor)> = out.iter().map(|(n, t)| (n.as_str(), t)).collect();
        augur_formats::safetensors::save(path, &refs).map_err(|e| Error::Spec(format!("writing MTP modules: {e}")))
    }

    /// Logits over the reduced vocabulary of `[.., dim]` states: the target's final norm and
    /// head.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(augur_nn::functional::rms_norm(h, &self.norm_f, self.eps)?.linear(&self.head)?)
    }

    /// Number of modules (the deepest draft).
    pub fn depth(&self) -> usize {
        self.modules.len()
    }
}

/// The MTP drafter: the modules and, per module, the cache and output states of the positions
/// whose inputs are all accepted.
pub struct Mtp {
    m: MtpModules,
    /// The target's final-norm hidden state of every position it has cached.
    h0: Vec<f32>,
    caches: Vec<KvCache>,
    /// Per module, the output states of its cached positions, `[positions, dim]`.
    outs: Vec<Vec<f32>>,
}

impl Mtp {
    /// A drafter with `m` (tokens are embedded by the target's embedding).
    pub fn new(m: MtpModules) -> Self {
        let d = m.depth();
        Mtp { m, h0: Vec::new(), caches: vec![KvCache::default(); d], outs: vec![Vec::new(); d] }
    }

    fn dim(&self) -> usize {
        self.m.norm_f.shape()[0]
    }

    /// Run module `d` (0-based) over `rows` positions: `h` their previous-depth states, `toks`
    /// their next tokens; on the cache itself, or on a copy when `speculative`.
    fn run(&mut self, target: &Llama, d: usize, h: Vec<f32>, toks: &[u32], speculative: bool) -> Result<Vec<f32>> {
        let (dim, rows) = (self.dim(), toks.len());
        let h = Tensor::from_vec(h, &[1, rows, dim])?;
        let e = Tensor::from_vec(target.embedding_rows(toks)?, &[1, rows, dim])?;
        let out = if speculative {
            let mut copy = self.caches[d].clone();
            self.m.modules[d].forward(&h, &e, &self.m.pos, Some(&mut copy))?
        } else {
            self.m.modules[d].forward(&h, &e, &self.m.pos, Some(&mut self.caches[d]))?
        };
        Ok(out.to_vec_f32()?)
    }

    fn draft(&self, state: &[f32]) -> Result<u32> {
        let l = self.m.logits(&Tensor::from_vec(state.to_vec(), &[1, self.dim()])?)?.to_vec_f32()?;
        Ok(self.m.vocab[argmax(&l) as usize])
    }
}

impl Drafter for Mtp {
    fn propose(&mut self, ctx: Ctx) -> Result<Tree> {
        no_grad(|| self.propose_chain(ctx))
    }

    fn wants_context_hidden(&self) -> bool {
        true
    }
}

impl Mtp {
    fn propose_chain(&mut self, ctx: Ctx) -> Result<Tree> {
        let dim = self.dim();
        // Positions 0..n are cached by the target; token n is pending.
        let t = ctx.tokens;
        let n = t.len() - 1;
        if ctx.context_hidden.len() == n * dim {
            // Every cached position is new: a new sequence (the drafter may be reused).
            self.h0.clear();
            self.caches.iter_mut().for_each(KvCache::clear);
            self.outs.iter_mut().for_each(Vec::clear);
        }
        self.h0.extend_from_slice(ctx.context_hidden);
        if self.h0.len() != n * dim {
            return Err(Error::Spec(format!("MTP: {} hidden states for {n} cached positions", self.h0.len() / dim)));
        }
        let mut drafts: Vec<u32> = Vec::new();
        // The previous depth's states of the speculative positions (module d reads positions
        // n - d + 1 .. n - 1 past its cache), from the module before.
        let mut spec_prev: Vec<f32> = Vec::new();
        for d in 0..self.m.depth().min(ctx.k) {
            let depth = d + 1;
            if n < depth {
                break;
            }
            let token = |i: usize| if i + depth <= n { t[i + depth] } else { drafts[i + depth - n - 1] };
            // Module d's inputs at positions `rows`: the previous depth's states (settled, or
            // from the module before's draft-reading positions) and the next tokens.
            let inputs = |this: &Self, rows: std::ops::Range<usize>| -> (Vec<f32>, Vec<u32>) {
                let settled = if d == 0 { &this.h0 } else { &this.outs[d - 1] };
                let c = settled.len() / dim;
                let mut h = Vec::with_capacity(rows.len() * dim);
                for i in rows.clone() {
                    h.extend_from_slice(if i < c { &settled[i * dim..(i + 1) * dim] } else { &spec_prev[(i - c) * dim..(i - c + 1) * dim] });
                }
                (h, rows.map(token).collect())
            };
            // Catch up on the positions whose inputs are all accepted: up to n - depth.
            let from = self.outs[d].len() / dim;
            if from < n + 1 - depth {
                let (h, toks) = inputs(self, from..n + 1 - depth);
                let out = self.run(ctx.target, d, h, &toks, false)?;
                self.outs[d].extend_from_slice(&out);
            }
            // Then the positions that read a draft token, on a copy of the cache.
            let spec = if depth == 1 {
                Vec::new()
            } else {
                let (h, toks) = inputs(self, n + 1 - depth..n);
                self.run(ctx.target, d, h, &toks, true)?
            };
            let last = if spec.is_empty() { &self.outs[d][(n - 1) * dim..n * dim] } else { &spec[spec.len() - dim..] };
            drafts.push(self.draft(last)?);
            spec_prev = spec;
        }
        Ok(Tree::chain(&drafts))
    }
}
