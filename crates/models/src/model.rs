//! Opening a model from a path: a GGUF file, or a directory with `config.json`, `tokenizer.json`
//! and safetensors weights.

use std::path::{Path, PathBuf};

use augur_core::Tensor;
use augur_formats::gguf::Gguf;
use augur_formats::safetensors::Checkpoint;
use augur_formats::tokenizer::Tokenizer;

use crate::{Config, Error, Llama, Result};

/// Weights, tokenizer and chat template of one model.
pub struct Model {
    /// Weights and forward pass.
    pub llama: Llama,
    /// The model's own tokenizer.
    pub tokenizer: Tokenizer,
    /// Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    /// Where it was loaded from.
    pub path: PathBuf,
}

/// HF checkpoint name of a GGUF tensor name.
pub(crate) fn hf_name(gguf: &str) -> String {
    const TOP: [(&str, &str); 3] =
        [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];
    if let Some((_, hf)) = TOP.iter().find(|(g, _)| *g == gguf) {
        return hf.to_string();
    }
    const BLK: [(&str, &str); 9] = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    let mut parts = gguf.splitn(4, '.');
    if let (Some("blk"), Some(i), Some(kind), Some(suffix)) = (parts.next(), parts.next(), parts.next(), parts.next()) {
        if let Some((_, hf)) = BLK.iter().find(|(g, _)| *g == kind) {
            return format!("model.layers.{i}.{hf}.{suffix}");
        }
    }
    gguf.to_string()
}

impl Model {
    /// Open a `.gguf` file or a safetensors checkpoint directory.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_safetensors(path)
        } else {
            Self::open_gguf(path)
        }
    }

    /// Open a GGUF file (weights memory-mapped, tokenizer and template from its metadata).
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let g = Gguf::open(path)?;
        let cfg = Config::from_gguf(&g)?;
        let llama = Llama::load(cfg, |n| Ok(g.tensor(n)?), |n| g.tensor_info(n).is_some())?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        check_vocab(&llama, &tokenizer)?;
        let chat_template = g.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_owned);
        Ok(Model { llama, tokenizer, chat_template, path: path.to_owned() })
    }

    /// Open a safetensors checkpoint directory with `config.json` and `tokenizer.json`.
    pub fn open_safetensors(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            std::fs::read_to_string(dir.join(name)).map_err(|e| Error::Path { path: dir.join(name), msg: e.to_string() })
        };
        let json: serde_json::Value =
            serde_json::from_str(&read("config.json")?).map_err(|e| Error::Path { path: dir.join("config.json"), msg: e.to_string() })?;
        let cfg = Config::from_hf_json(&json)?;
        let ck = Checkpoint::open(dir)?;
        let get = |n: &str| -> Result<Tensor> { Ok(ck.get(&hf_name(n))?) };
        let llama = Llama::load(cfg, get, |n| ck.contains(&hf_name(n)))?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        check_vocab(&llama, &tokenizer)?;
        let chat_template = read("tokenizer_config.json")
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|j| j.get("chat_template").and_then(|t| t.as_str()).map(str::to_owned))
            .or_else(|| read("chat_template.jinja").ok());
        Ok(Model { llama, tokenizer, chat_template, path: dir.to_owned() })
    }
}

fn check_vocab(llama: &Llama, tok: &Tokenizer) -> Result<()> {
    if tok.vocab_size() > llama.cfg.vocab {
        return Err(Error::Config(format!(
            "tokenizer has {} tokens but the model's vocabulary is {}; tokenizer and weights do not belong together",
            tok.vocab_size(),
            llama.cfg.vocab
        )));
    }
    Ok(())
}

/// Write the first `n_layers` blocks of a GGUF model (with its embeddings, final norm, head and
/// tokenizer) as a new GGUF: a draft model that shares the target's vocabulary exactly.
pub fn write_truncated_gguf(src: &Path, dst: &Path, n_layers: usize) -> Result<()> {
    write_truncated_gguf_with(src, dst, n_layers, &|_| None)
}

/// [`write_truncated_gguf`] with tensors replaced: `replace(name)` returns what to write under a
/// kept GGUF name instead of the source's tensor (a trained draft model's blocks).
pub fn write_truncated_gguf_with(src: &Path, dst: &Path, n_layers: usize, replace: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
    use augur_formats::gguf::{Value, Writer};
    let g = Gguf::open(src)?;
    let cfg = Config::from_gguf(&g)?;
    if n_layers == 0 || n_layers > cfg.n_layer {
        return Err(Error::Config(format!("cannot keep {n_layers} of {} layers", cfg.n_layer)));
    }
    let mut w = Writer::new();
    let block_count = format!("{}.block_count", cfg.arch);
    for (k, v) in g.metadata() {
        if *k == block_count {
            w.metadata(k.clone(), Value::U32(n_layers as u32));
        } else if k != "general.alignment" {
            w.metadata(k.clone(), v.clone());
        }
    }
    for t in g.tensors() {
        let keep = match t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => i < n_layers,
            None => true,
        };
        if keep {
            let tensor = match replace(&t.name) {
                Some(r) => r,
                None => g.tensor(&t.name)?,
            };
            w.tensor(t.name.clone(), &tensor)?;
        }
    }
    w.write(dst)?;
    Ok(())
}

/// GGUF llama files store q/k rows permuted for interleaved RoPE (llama.cpp's `permute`): HF row
/// `h*hd + j*hd/2 + i` is GGUF row `h*hd + 2i + j`. HF order to GGUF order, for `[n_head * hd,
/// cols]` rows.
pub fn qk_rows_to_gguf(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    permute_qk(w, n_head, cols, true)
}

/// The inverse of [`qk_rows_to_gguf`]: GGUF q/k row order back to HF's rotate-half order.
pub fn qk_rows_from_gguf(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    permute_qk(w, n_head, cols, false)
}

fn permute_qk(w: &[f32], n_head: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    let hd = w.len() / cols / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (hf, gg) = (h * hd + j * (hd / 2) + i, h * hd + 2 * i + j);
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn qk_permutation_round_trips() {
        let w: Vec<f32> = (0..2 * 8 * 3).map(|i| i as f32).collect();
        let g = super::qk_rows_to_gguf(&w, 2, 3);
        assert_ne!(g, w);
        assert_eq!(super::qk_rows_from_gguf(&g, 2, 3), w);
        // HF row 4 (head 0, second half, i = 0) is GGUF row 1.
        assert_eq!(&g[3..6], &w[12..15]);
    }

    #[test]
    fn maps_gguf_names_to_hf() {
        assert_eq!(hf_name("blk.12.attn_q.weight"), "model.layers.12.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias"), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.3.ffn_norm.weight"), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
