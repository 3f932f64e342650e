//! A small decoder-only transformer (GPT) built from the `nn` layers: the model augur trains
//! from scratch, with a choice of norm, MLP and positional encoding.

use std::path::Path;

use augur_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Error, Result};
use crate::functional::KvCache;
use crate::layers::{Dropout, Embedding, GeluMlp, LayerNorm, Linear, MultiHeadAttention, RmsNorm, SwiGlu};
use crate::module::{join, Module};
use crate::posenc::{PosKind, PositionalEncoding, Rope, RopeScaling};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// Which normalisation the blocks use.
pub enum NormKind {
    /// LayerNorm with bias (GPT-2).
    Layer,
    /// RMSNorm (Llama).
    Rms,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// Which MLP the blocks use.
pub enum MlpKind {
    /// `fc → GELU → proj` (GPT-2).
    Gelu,
    /// SwiGLU (Llama).
    Swiglu,
}

/// The shape and parts of a [`Gpt`]; stored as `config.json` beside its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// Positions a learned table holds (other encodings have no limit).
    pub max_seq: usize,
    /// Positional encoding.
    pub pos: PosKind,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE frequency scaling (applied at evaluation for extrapolation).
    pub rope_scaling: RopeScaling,
    /// Normalisation.
    pub norm: NormKind,
    /// MLP kind.
    pub mlp: MlpKind,
    /// Biases in linear layers.
    pub bias: bool,
    /// Output head shares the embedding.
    pub tied: bool,
    /// Dropout probability in training.
    pub dropout: f64,
    /// Normalisation epsilon.
    pub norm_eps: f64,
    /// Standard deviation of the initial weights.
    pub init_std: f64,
    /// Seed of the initial weights.
    pub seed: u64,
}

impl Default for GptConfig {
    /// About 10.7M parameters over a byte vocabulary: 6 layers of width 384.
    fn default() -> Self {
        GptConfig {
            vocab: 256,
            dim: 384,
            n_layer: 6,
            n_head: 6,
            n_kv_head: 6,
            hidden: 1536,
            max_seq: 2048,
            pos: PosKind::Rope,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            norm: NormKind::Layer,
            mlp: MlpKind::Gelu,
            bias: false,
            tied: true,
            dropout: 0.0,
            norm_eps: 1e-5,
            init_std: 0.02,
            seed: 0,
        }
    }
}

impl GptConfig {
    /// A named preset: `tiny` (~0.2M, for tests), `small` (~10.7M, the default).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "small" => Ok(GptConfig::default()),
            "tiny" => Ok(GptConfig { dim: 64, n_layer: 2, n_head: 4, n_kv_head: 4, hidden: 256, max_seq: 1024, ..GptConfig::default() }),
            _ => invalid(format!("unknown model preset `{name}` (tiny, small, or a path to a config JSON file)")),
        }
    }

    /// A preset name or a JSON file.
    pub fn from_arg(arg: &str) -> Result<Self> {
        if Path::new(arg).is_file() {
            Self::from_file(Path::new(arg))
        } else {
            Self::preset(arg)
        }
    }

    /// Read a config from a JSON file (unknown keys rejected), validated.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| Error::Io { path: path.into(), err })?;
        let cfg: GptConfig = serde_json::from_str(&text).map_err(|err| Error::Json { path: path.into(), err })?;
        cfg.validate()
    }

    /// Check the dimensions fit together (heads divide the width, …).
    pub fn validate(self) -> Result<Self> {
        if self.n_head == 0 || self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return invalid(format!("{} heads cannot be grouped over {} KV heads", self.n_head, self.n_kv_head));
        }
        if self.dim == 0 || !self.dim.is_multiple_of(self.n_head) || (self.pos == PosKind::Rope && (self.dim / self.n_head) % 2 == 1) {
            return invalid(format!("width {} must split into {} heads (of even size for RoPE)", self.dim, self.n_head));
        }
        if self.vocab == 0 || self.n_layer == 0 || self.hidden == 0 {
            return invalid("vocab, n_layer and hidden must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        Ok(self)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }
}

#[derive(Debug, Clone)]
enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn new(kind: NormKind, dim: usize, eps: f64) -> Self {
        match kind {
            NormKind::Layer => Norm::Layer(LayerNorm::new(dim, eps)),
            NormKind::Rms => Norm::Rms(RmsNorm::new(dim, eps)),
        }
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        match self {
            Norm::Layer(n) => n.visit(prefix, f),
            Norm::Rms(n) => n.visit(prefix, f),
        }
    }
}

#[derive(Debug, Clone)]
enum Mlp {
    Gelu(GeluMlp),
    Swiglu(SwiGlu),
}

/// One pre-norm transformer block.
#[derive(Debug)]
pub struct Block {
    norm1: Norm,
    attn: MultiHeadAttention,
    norm2: Norm,
    mlp: Mlp,
    drop: Dropout,
}

impl Block {
    /// Block `layer` of a model described by `c`, initialised as [`Gpt::new`] does.
    pub fn new(c: &GptConfig, layer: usize, rng: &mut Rng) -> Self {
        let out_std = c.init_std / (2.0 * c.n_layer as f64).sqrt();
        Block {
            norm1: Norm::new(c.norm, c.dim, c.norm_eps),
            attn: MultiHeadAttention::new(c.dim, c.n_head, c.n_kv_head, c.bias, c.init_std, out_std, rng),
            norm2: Norm::new(c.norm, c.dim, c.norm_eps),
            mlp: match c.mlp {
                MlpKind::Gelu => Mlp::Gelu(GeluMlp::new(c.dim, c.hidden, c.bias, c.init_std, out_std, rng)),
                MlpKind::Swiglu => Mlp::Swiglu(SwiGlu::new(c.dim, c.hidden, c.init_std, out_std, rng)),
            },
            drop: Dropout::new(c.dropout, c.seed ^ ((layer as u64 + 1) * 0x9E37)),
        }
    }

    /// `x + attn(norm1(x)) → + mlp(norm2(·))` over `x: [batch, seq, dim]`; positions continue
    /// after the cache's, which grows.
    pub fn forward(&self, x: &Tensor, pos: &PositionalEncoding, bias: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, pos, bias, cache)?;
        let x = x.add(&self.drop.forward(&a)?)?;
        let h = self.norm2.forward(&x)?;
        let m = match &self.mlp {
            Mlp::Gelu(m) => m.forward(&h)?,
            Mlp::Swiglu(m) => m.forward(&h)?,
        };
        Ok(x.add(&self.drop.forward(&m)?)?)
    }
}

impl Module for Block {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.norm1.visit(&join(prefix, "norm1"), f);
        self.attn.visit(&join(prefix, "attn"), f);
        self.norm2.visit(&join(prefix, "norm2"), f);
        match &mut self.mlp {
            Mlp::Gelu(m) => m.visit(&join(prefix, "mlp"), f),
            Mlp::Swiglu(m) => m.visit(&join(prefix, "mlp"), f),
        }
    }
    fn set_training(&mut self, training: bool) {
        self.drop.set_training(training);
    }
}

/// A decoder-only transformer: token embedding, positional encoding, pre-norm blocks, final
/// norm, and an output head (tied to the embedding by default).
#[derive(Debug)]
pub struct Gpt {
    /// The hyperparameters.
    pub config: GptConfig,
    tok: Embedding,
    pos: PositionalEncoding,
    blocks: Vec<Block>,
    norm_f: Norm,
    head: Option<Linear>,
    drop: Dropout,
}

impl Gpt {
    /// A freshly initialised model (GPT-2's scheme: N(0, 0.02), residual projections scaled by
    /// 1/√(2·layers), unit norms, zero biases), reproducible from `config.seed`.
    pub fn new(config: GptConfig) -> Result<Self> {
        let c = config.validate()?;
        let mut rng = Rng::new(c.seed);
        let tok = Embedding::new(c.vocab, c.dim, c.init_std, &mut rng);
        let rope = Rope { dim: c.head_dim(), theta: c.rope_theta, scaling: c.rope_scaling, interleaved: false };
        let pos = PositionalEncoding::new(c.pos, c.dim, c.n_head, c.head_dim(), c.max_seq, rope, &mut rng);
        let blocks = (0..c.n_layer).map(|l| Block::new(&c, l, &mut rng)).collect();
        let head = (!c.tied).then(|| Linear::new(c.dim, c.vocab, false, c.init_std, &mut rng));
        Ok(Gpt { norm_f: Norm::new(c.norm, c.dim, c.norm_eps), drop: Dropout::new(c.dropout, c.seed ^ 0xD509), tok, pos, blocks, head, config: c })
    }

    /// Change the RoPE scaling used from now on (evaluating past the training length).
    pub fn set_rope_scaling(&mut self, scaling: RopeScaling) {
        if let PositionalEncoding::Rope(r) = &mut self.pos {
            r.scaling = scaling;
        }
        self.config.rope_scaling = scaling;
    }

    /// Logits `[batch, seq, vocab]` for ids `[batch, seq]` (row-major). With caches (one per
    /// layer), positions continue after the cached ones and the caches grow.
    pub fn forward(&self, ids: &[u32], batch: usize, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        if batch == 0 || !ids.len().is_multiple_of(batch) || ids.is_empty() {
            return invalid(format!("{} ids do not form {batch} equal rows", ids.len()));
        }
        let seq = ids.len() / batch;
        let start = caches.as_ref().map_or(0, |c| c.first().map_or(0, KvCache::len));
        let mut x = self.tok.forward(ids, &[batch, seq])?;
        x = self.drop.forward(&self.pos.add_to_input(&x, start)?)?;
        let (bias, _) = self.pos.attention_bias(seq, start + seq)?;
        match caches {
            Some(cs) => {
                if cs.len() != self.blocks.len() {
                    return invalid(format!("{} caches for {} layers", cs.len(), self.blocks.len()));
                }
                for (b, c) in self.blocks.iter().zip(cs.iter_mut()) {
                    x = b.forward(&x, &self.pos, bias.as_ref(), Some(c))?;
                }
            }
            None => {
                for b in &self.blocks {
                    x = b.forward(&x, &self.pos, bias.as_ref(), None)?;
                }
            }
        }
        let x = self.norm_f.forward(&x)?;
        Ok(match &self.head {
            Some(h) => h.forward(&x)?,
            None => x.linear(&self.tok.weight)?,
        })
    }

    /// Mean next-token cross-entropy of `[batch, seq]` inputs against `[batch, seq]` targets.
    pub fn loss(&self, ids: &[u32], targets: &[u32], batch: usize) -> Result<Tensor> {
        let logits = self.forward(ids, batch, None)?;
        let v = self.config.vocab;
        Ok(logits.reshape(&[ids.len(), v])?.cross_entropy(targets, None)?)
    }

    /// Empty KV caches, one per layer.
    pub fn new_caches(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }
}

impl Module for Gpt {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.tok.visit(&join(prefix, "tok_emb"), f);
        self.pos.visit(&join(prefix, "pos"), f);
        self.blocks.visit(&join(prefix, "blocks"), f);
        self.norm_f.visit(&join(prefix, "norm_f"), f);
        if let Some(h) = &mut self.head {
            h.visit(&join(prefix, "head"), f);
        }
    }
    fn set_training(&mut self, training: bool) {
        self.drop.set_training(training);
        self.blocks.set_training(training);
    }
}
