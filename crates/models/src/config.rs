//! Llama-family hyperparameters, from GGUF metadata or an HF `config.json`.

use augur_formats::gguf::Gguf;
use serde_json::Value as Json;

use crate::{Error, Result};

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (linear interpolation).
    Linear {
        /// Context extension factor.
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Overall extension factor.
        factor: f32,
        /// Wavelengths above `original_context / low_freq_factor` are scaled fully.
        low_freq_factor: f32,
        /// Wavelengths below `original_context / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// Context length the model was trained with.
        original_context: f32,
    },
}

/// Hyperparameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Architecture name (`llama`, `qwen2`, `mistral`).
    pub arch: String,
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// Number of decoder blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Rotate pairs `(2i, 2i+1)` (GGUF llama weights, permuted by the converter) instead of
    /// `(i, i + head_dim/2)` (HF weights; GGUF qwen2).
    pub rope_interleaved: bool,
    /// Longest sequence (positions) the model supports.
    pub context: usize,
    /// The output head reuses the token embedding.
    pub tied_embeddings: bool,
}

impl Config {
    /// Read from GGUF metadata (`{arch}.*` keys). `vocab` falls back to the token embedding rows.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::Config(format!(
                "architecture `{arch}` is not supported (augur runs llama, qwen2 and mistral GGUF files)"
            )));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_head = g.get_u64(&k("attention.head_count"))? as usize;
        let dim = g.get_u64(&k("embedding_length"))? as usize;
        let vocab = match g.get_u64(&k("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => g.tensor_info("token_embd.weight").map(|t| t.shape[0]).ok_or_else(|| Error::Config("no vocab size and no token_embd.weight".into()))?,
        };
        let rope_scaling = match g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => RopeScaling::Linear { factor: g.get_f64(&k("rope.scaling.factor"))? as f32 },
            _ => RopeScaling::None,
        };
        let cfg = Config {
            vocab,
            dim,
            hidden: g.get_u64(&k("feed_forward_length"))? as usize,
            n_layer: g.get_u64(&k("block_count"))? as usize,
            n_head,
            n_kv_head: g.get_u64(&k("attention.head_count_kv")).map(|v| v as usize).unwrap_or(n_head),
            head_dim: g.get_u64(&k("attention.key_length")).map(|v| v as usize).unwrap_or(dim.checked_div(n_head).unwrap_or(0)),
            rms_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: g.get_f64(&k("rope.freq_base")).map(|v| v as f32).unwrap_or(10000.0),
            rope_scaling,
            rope_interleaved: arch != "qwen2",
            context: g.get_u64(&k("context_length")).map(|v| v as usize).unwrap_or(4096),
            tied_embeddings: g.tensor_info("output.weight").is_none(),
            arch,
        };
        cfg.validate()
    }

    /// Read an HF `config.json` document.
    pub fn from_hf_json(j: &Json) -> Result<Self> {
        let u = |key: &str| j.get(key).and_then(Json::as_u64).map(|v| v as usize);
        let need = |key: &str| u(key).ok_or_else(|| Error::Config(format!("config.json: missing integer `{key}`")));
        let arch = j.get("model_type").and_then(Json::as_str).unwrap_or("llama").to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::Config(format!("config.json: model_type `{arch}` is not supported (llama, qwen2, mistral)")));
        }
        let n_head = need("num_attention_heads")?;
        let dim = need("hidden_size")?;
        let rope = j.get("rope_parameters").or_else(|| j.get("rope_scaling")).filter(|v| v.is_object());
        let theta = j
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(Json::as_f64)
            .unwrap_or(10000.0) as f32;
        let f = |key: &str, d: f64| rope.and_then(|r| r.get(key)).and_then(Json::as_f64).unwrap_or(d) as f32;
        let rope_scaling = match rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Json::as_str) {
            Some("linear") => RopeScaling::Linear { factor: f("factor", 1.0) },
            Some("llama3") => RopeScaling::Llama3 {
                factor: f("factor", 8.0),
                low_freq_factor: f("low_freq_factor", 1.0),
                high_freq_factor: f("high_freq_factor", 4.0),
                original_context: f("original_max_position_embeddings", 8192.0),
            },
            _ => RopeScaling::None,
        };
        let cfg = Config {
            vocab: need("vocab_size")?,
            dim,
            hidden: need("intermediate_size")?,
            n_layer: need("num_hidden_layers")?,
            n_head,
            n_kv_head: u("num_key_value_heads").unwrap_or(n_head),
            head_dim: u("head_dim").unwrap_or(dim.checked_div(n_head).unwrap_or(0)),
            rms_eps: j.get("rms_norm_eps").and_then(Json::as_f64).unwrap_or(1e-6) as f32,
            rope_theta: theta,
            rope_scaling,
            rope_interleaved: false,
            context: u("max_position_embeddings").unwrap_or(4096),
            tied_embeddings: j.get("tie_word_embeddings").and_then(Json::as_bool).unwrap_or(false),
            arch,
        };
        cfg.validate()
    }

    fn validate(self) -> Result<Self> {
        let bad = |m: String| Err(Error::Config(m));
        if self.n_head == 0 || self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!("{} heads cannot be grouped over {} KV heads", self.n_head, self.n_kv_head));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even and positive", self.head_dim));
        }
        if self.dim == 0 || self.hidden == 0 || self.vocab == 0 || self.n_layer == 0 {
            return bad(format!("zero-sized model: dim {} hidden {} vocab {} layers {}", self.dim, self.hidden, self.vocab, self.n_layer));
        }
        if self.n_layer > 4096 || self.dim > 1 << 20 || self.vocab > 1 << 24 || self.context > 1 << 24 {
            return bad("implausible model size; the file is corrupt".into());
        }
        Ok(self)
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them, with the configured scaling. Computed in
    /// f32 as HF transformers does (`1 / theta^(2i/d)`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32)).collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                let low_wl = original_context / low_freq_factor;
                let high_wl = original_context / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let s = (original_context / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect()
            }
        }
    }
}
