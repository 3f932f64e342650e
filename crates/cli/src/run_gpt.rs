//! `augur run` on a checkpoint written by `augur train`: sampled generation with a KV cache.

use std::io::Write;
use std::path::Path;

use anyhow::{ensure, Result};
use augur_core::no_grad;
use augur_decode::sampler::Sampler;
use augur_formats::tokenizer::{StreamDecoder, Tokenizer};

use crate::run::Args;

/// Is `dir` a checkpoint of `augur train`?
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.is_dir() && dir.join("trainer.json").is_file() && dir.join("model.safetensors").is_file()
}

pub fn main(dir: &Path, a: &Args) -> Result<()> {
    let model = augur_nn::train::load_model(dir)?;
    let tok = dir.join("tokenizer.json");
    let tokenizer = tok.is_file().then(|| Tokenizer::from_file(&tok)).transpose()?;
    let prompt: Vec<u32> = match (&a.prompt_ids, &a.prompt, &tokenizer) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(t), Some(tk)) => tk.encode(t)?,
        (None, Some(t), None) => t.bytes().map(u32::from).collect(),
        (None, None, _) => anyhow::bail!("no prompt: give PROMPT text or --prompt-ids"),
    };
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let vocab = model.config.vocab;
    ensure!(prompt.iter().all(|&i| (i as usize) < vocab), "a prompt token is outside this model's vocabulary of {vocab}");
    let mut sampler = Sampler::new(a.sample.config())?;
    let mut caches = model.new_caches();
    let mut history = prompt.clone();
    let mut logits = no_grad(|| model.forward(&prompt, 1, Some(&mut caches)))?;
    let mut out = std::io::stdout().lock();
    let mut bytes = Vec::new();
    let mut stream = StreamDecoder::new();
    for _ in 0..a.max_tokens.unwrap_or(256) {
        let v = logits.narrow(1, logits.shape()[1] - 1, 1)?.to_vec_f32()?;
        let id = sampler.sample(&v, &history);
        history.push(id);
        match &tokenizer {
            Some(tk) => write!(out, "{}", stream.push(tk, id)?)?,
            None => {
                // Bytes: print whole UTF-8 characters as they complete.
                bytes.push(id as u8);
                if let Ok(s) = std::str::from_utf8(&bytes) {
                    write!(out, "{s}")?;
                    bytes.clear();
                } else if bytes.len() >= 4 {
                    write!(out, "{}", String::from_utf8_lossy(&bytes))?;
                    bytes.clear();
                }
            }
        }
        out.flush()?;
        logits = no_grad(|| model.forward(&[id], 1, Some(&mut caches)))?;
    }
    writeln!(out)?;
    Ok(())
}
