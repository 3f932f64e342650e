//! Tiny random Llama models written by augur itself, for tests: the same weights as a GGUF file
//! (llama.cpp conventions: q/k rows permuted for interleaved RoPE, optional quantization) and as an
//! HF-style safetensors checkpoint (config.json, tokenizer.json, model.safetensors).

use std::path::{Path, PathBuf};

use augur_core::{Bytes, DType, QuantType, Tensor};
use augur_formats::gguf::{Gguf, Value, ValueType, Writer};
use augur_formats::tokenizer::Tokenizer;
use serde_json::json;

use crate::{Config, Error, Result, RopeScaling};

/// Shape of the tiny model: every matrix dimension is a multiple of 256 so every GGUF block type
/// (K-quants included) can store it.
pub fn config(tied: bool) -> Config {
    config_arch("llama", tied)
}

/// [`config`] for `llama` or `qwen2` (q/k/v biases; GGUF keeps HF's rotate-half q/k order).
pub fn config_arch(arch: &str, tied: bool) -> Config {
    Config {
        arch: arch.into(),
        vocab: VOCAB.len() + 256 + MERGES.len(),
        dim: 256,
        hidden: 512,
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 64,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rope_interleaved: arch != "qwen2",
        context: 256,
        tied_embeddings: tied,
    }
}

const VOCAB: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 4] = ["h e", "l l", "he ll", "hell o"];

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("valid char")
}

fn tokens() -> Vec<String> {
    let mut t: Vec<String> = VOCAB.iter().map(|s| s.to_string()).collect();
    t.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    t.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    t
}

struct Rand(u64);
impl Rand {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

/// The tiny model's weights in HF layout, by GGUF name.
fn weights(cfg: &Config, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut r = Rand(seed);
    let (d, h) = (cfg.dim, cfg.hidden);
    let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
    let mut w = vec![("token_embd.weight".to_string(), vec![cfg.vocab, d], r.vec(cfg.vocab * d, 1.0))];
    for i in 0..cfg.n_layer {
        let s = 1.0 / (d as f32).sqrt();
        let norm = |r: &mut Rand| r.vec(d, 0.2).iter().map(|v| 1.0 + v).collect::<Vec<_>>();
        w.push((format!("blk.{i}.attn_norm.weight"), vec![d], norm(&mut r)));
        w.push((format!("blk.{i}.attn_q.weight"), vec![qd, d], r.vec(qd * d, 2.0 * s)));
        w.push((format!("blk.{i}.attn_k.weight"), vec![kvd, d], r.vec(kvd * d, 2.0 * s)));
        w.push((format!("blk.{i}.attn_v.weight"), vec![kvd, d], r.vec(kvd * d, s)));
        w.push((format!("blk.{i}.attn_output.weight"), vec![d, qd], r.vec(d * qd, s)));
        if cfg.arch == "qwen2" {
            w.push((format!("blk.{i}.attn_q.bias"), vec![qd], r.vec(qd, 0.5)));
            w.push((format!("blk.{i}.attn_k.bias"), vec![kvd], r.vec(kvd, 0.5)));
            w.push((format!("blk.{i}.attn_v.bias"), vec![kvd], r.vec(kvd, 0.5)));
        }
        w.push((format!("blk.{i}.ffn_norm.weight"), vec![d], norm(&mut r)));
        w.push((format!("blk.{i}.ffn_gate.weight"), vec![h, d], r.vec(h * d, s)));
        w.push((format!("blk.{i}.ffn_up.weight"), vec![h, d], r.vec(h * d, s)));
        w.push((format!("blk.{i}.ffn_down.weight"), vec![d, h], r.vec(d * h, 1.0 / (h as f32).sqrt())));
    }
    w.push(("output_norm.weight".to_string(), vec![d], vec![1.0; d]));
    if !cfg.tied_embeddings {
        w.push(("output.weight".to_string(), vec![cfg.vocab, d], r.vec(cfg.vocab * d, 0.5)));
    }
    w
}

const TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Write the tiny model as GGUF (matrices in `quant`, or f32) to `path`.
pub fn write_gguf(path: &Path, tied: bool, quant: Option<QuantType>, seed: u64) -> Result<()> {
    write_gguf_arch(path, "llama", tied, quant, seed)
}

/// [`write_gguf`] for `llama` or `qwen2`.
pub fn write_gguf_arch(path: &Path, arch: &str, tied: bool, quant: Option<QuantType>, seed: u64) -> Result<()> {
    write_gguf_config(path, &config_arch(arch, tied), quant, quant, seed)
}

/// SmolLM2-135M's shape (30 blocks of width 576, 9 query and 3 key/value heads, vocabulary
/// 49152, context 8192), for random-weight models that time like the default model.
pub fn smollm2_135m_config() -> Config {
    Config {
        arch: "llama".into(),
        vocab: 49152,
        dim: 576,
        hidden: 1536,
        n_layer: 30,
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
        rms_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: RopeScaling::None,
        rope_interleaved: true,
        context: 8192,
        tied_embeddings: true,
    }
}

/// Write random weights of shape `cfg` as GGUF, with the tiny tokenizer (its 263 tokens are ids
/// of the larger vocabulary): block matrices in `quant`, the embedding (and head) in `embed`,
/// f32 where `None`. Row lengths must suit the block types.
pub fn write_gguf_config(path: &Path, cfg: &Config, quant: Option<QuantType>, embed: Option<QuantType>, seed: u64) -> Result<()> {
    let cfg = cfg.clone();
    let arch = cfg.arch.as_str();
    let mut wr = Writer::new();
    let s = |v: &str| Value::String(v.into());
    let u = |v: usize| Value::U32(v as u32);
    let toks = tokens();
    let types: Vec<Value> = (0..toks.len()).map(|i| Value::I32(if i < VOCAB.len() { 3 } else { 1 })).collect();
    let k = |key: &str| format!("{arch}.{key}");
    wr.metadata("general.architecture", s(arch))
        .metadata("general.name", s("augur-tiny"))
        .metadata(k("context_length"), u(cfg.context))
        .metadata(k("embedding_length"), u(cfg.dim))
        .metadata(k("feed_forward_length"), u(cfg.hidden))
        .metadata(k("block_count"), u(cfg.n_layer))
        .metadata(k("attention.head_count"), u(cfg.n_head))
        .metadata(k("attention.head_count_kv"), u(cfg.n_kv_head))
        .metadata(k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_eps))
        .metadata(k("rope.freq_base"), Value::F32(cfg.rope_theta))
        .metadata(k("vocab_size"), u(cfg.vocab))
        .metadata("tokenizer.ggml.model", s("gpt2"))
        .metadata("tokenizer.ggml.pre", s("smollm"))
        .metadata("tokenizer.ggml.tokens", Value::Array(ValueType::String, toks.iter().map(|t| s(t)).collect()))
        .metadata("tokenizer.ggml.token_type", Value::Array(ValueType::I32, types))
        .metadata("tokenizer.ggml.merges", Value::Array(ValueType::String, MERGES.iter().map(|m| s(m)).collect()))
        .metadata("tokenizer.ggml.bos_token_id", u(1))
        .metadata("tokenizer.ggml.eos_token_id", u(2))
        .metadata("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .metadata("tokenizer.chat_template", s(TEMPLATE));
    for (name, shape, mut data) in weights(&cfg, seed) {
        if !cfg.rope_interleaved {
            // qwen2 GGUF files keep HF's q/k row order (llama.cpp uses NEOX RoPE for them).
        } else if name.ends_with("attn_q.weight") {
            data = crate::model::qk_rows_to_gguf(&data, cfg.n_head, cfg.dim);
        } else if name.ends_with("attn_k.weight") {
            data = crate::model::qk_rows_to_gguf(&data, cfg.n_kv_head, cfg.dim);
        }
        let q = if name.starts_with("blk.") { quant } else { embed };
        let t = match q {
            Some(q) if shape.len() == 2 => {
                let bytes: Vec<u8> = data.chunks(shape[1]).flat_map(|row| q.quantize_row(row)).collect();
                Tensor::from_raw(DType::Quant(q), Bytes::from_vec(bytes), &shape)?
            }
            _ => Tensor::from_vec(data, &shape)?,
        };
        wr.tensor(name, &t)?;
    }
    wr.write(path)?;
    Ok(())
}

fn hf_json_name(g: &str) -> String {
    crate::model::hf_name(g)
}

/// The model at `path` twice: on the host, and moved to CUDA device 0. `Ok(None)`, after
/// saying why on stderr, where no driver or device is present, so GPU tests skip cleanly.
#[cfg(feature = "cuda")]
pub fn open_on_host_and_device(path: &Path) -> Result<Option<(crate::Model, crate::Model)>> {
    let cpu = crate::Model::open(path)?;
    let mut gpu = crate::Model::open(path)?;
    Ok(match gpu.llama.to_device(0) {
        Ok(()) => Some((cpu, gpu)),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    })
}

/// Write the same tiny model (f32) as an HF checkpoint directory.
pub fn write_safetensors(dir: &Path, tied: bool, seed: u64) -> Result<()> {
    write_safetensors_arch(dir, "llama", tied, seed)
}

/// [`write_safetensors`] for `llama` or `qwen2`.
pub fn write_safetensors_arch(dir: &Path, arch: &str, tied: bool, seed: u64) -> Result<()> {
    let cfg = config_arch(arch, tied);
    std::fs::create_dir_all(dir).map_err(|e| Error::Path { path: dir.into(), msg: e.to_string() })?;
    let named: Vec<(String, Tensor)> = weights(&cfg, seed)
        .into_iter()
        .map(|(n, shape, data)| Ok((hf_json_name(&n), Tensor::from_vec(data, &shape)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    augur_formats::safetensors::save(&dir.join("model.safetensors"), &refs)?;
    let config = json!({
        "architectures": [if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }], "model_type": arch, "vocab_size": cfg.vocab,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.context, "tie_word_embeddings": tied,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).map_err(|e| Error::Path { path: dir.join(name), msg: e.to_string() });
    write("config.json", config.to_string())?;
    // The tokenizer.json is the one augur builds from the GGUF metadata.
    let tmp = dir.join("tokenizer-source.gguf");
    write_gguf_arch(&tmp, arch, tied, None, seed)?;
    let tok = Tokenizer::from_gguf(&Gguf::open(&tmp)?)?;
    std::fs::remove_file(&tmp).ok();
    write("tokenizer.json", tok.to_json()?)?;
    write(
        "tokenizer_config.json",
        json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": TEMPLATE}).to_string(),
    )?;
    Ok(())
}

/// Write both forms under `dir`; returns (gguf file, safetensors dir).
pub fn write_both(dir: &Path, tied: bool, seed: u64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Path { path: dir.into(), msg: e.to_string() })?;
    let g = dir.join("tiny.gguf");
    write_gguf(&g, tied, None, seed)?;
    let s = dir.join("tiny-hf");
    write_safetensors(&s, tied, seed)?;
    Ok((g, s))
}
