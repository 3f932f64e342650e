//! `augur bench`: prefill and decode speed, median over runs, as JSON.

use std::time::Instant;

use anyhow::{ensure, Result};
use augur_decode::sampler::argmax;
use augur_models::{Logits, State};
use serde_json::json;

use crate::common::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(long, short = 'p', default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, short = 'g', default_value_t = 128)]
    pub gen_len: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn main(a: Args) -> Result<()> {
    ensure!(a.runs > 0, "--runs must be at least 1");
    ensure!(a.prompt_len > 0, "--prompt-len must be at least 1");
    let model = a.model.load()?;
    let cfg = &model.llama.cfg;
    ensure!(a.prompt_len + a.gen_len <= cfg.context, "prompt-len + gen-len exceeds the context of {}", cfg.context);
    // A deterministic prompt of ordinary tokens (the tokenized text repeated to length).
    let text = model.tokenizer.encode("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg built a machine that changed how knowledge spread across Europe. ")?;
    let prompt: Vec<u32> = text.iter().copied().cycle().take(a.prompt_len).collect();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut st = State::new(cfg);
    st.reserve(cfg, a.prompt_len + a.gen_len);
    for run in 0..=a.runs {
        st.truncate(0);
        let t0 = Instant::now();
        let mut next = argmax(model.llama.forward(&mut st, &prompt, Logits::Last)?);
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..a.gen_len {
            next = argmax(model.llama.forward(&mut st, &[next], Logits::Last)?);
        }
        let td = t1.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push(a.prompt_len as f64 / tp);
            if a.gen_len > 0 {
                decode.push(a.gen_len as f64 / td);
            }
        }
    }
    let r = |v: &[f64]| v.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>();
    println!(
        "{}",
        json!({
            "model": model.path.display().to_string(),
            "threads": augur_kernels::pool::global().threads(),
            "prompt_len": a.prompt_len,
            "gen_len": a.gen_len,
            "runs": a.runs,
            "prefill_tok_per_s": median(prefill.clone()),
            "decode_tok_per_s": if decode.is_empty() { serde_json::Value::Null } else { json!(median(decode.clone())) },
            "prefill_runs": r(&prefill),
            "decode_runs": r(&decode),
        })
    );
    Ok(())
}
