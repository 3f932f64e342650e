//! `augur run`.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{bail, Context, Result};
use augur_decode::chat::{ChatTemplate, Message};
use augur_decode::speculative::{self, SpecConfig, SpecStats};
use augur_decode::{generate, GenerateConfig, StopReason, TokenEvent};
use serde_json::json;

use crate::common::{DraftArgs, ModelArgs, PrecisionArgs, SampleArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Most tokens to generate (default: 256, or what the context leaves room for).
    #[arg(long, short = 'n')]
    pub max_tokens: Option<usize>,
    /// Wrap PROMPT as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Start from these token ids (comma separated) instead of PROMPT text.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// One JSON object per token, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// With --json: the K highest raw logits of each step.
    #[arg(long, default_value_t = 0)]
    pub top_logits: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Print timing (and speculation statistics) to stderr after the text.
    #[arg(long)]
    pub stats: bool,
    /// Speculative decoding: `prompt-lookup`, `draft:PATH` (a smaller model with the same
    /// tokenizer), `early-exit:L` (the model's first L layers), `medusa:PATH` (heads from
    /// `augur train-medusa`) or `mtp:PATH` (modules from `augur train-mtp`). Output is unchanged.
    #[arg(long)]
    pub spec: Option<String>,
    #[command(flatten)]
    pub draft: DraftArgs,
    /// Typical acceptance `EPS,DELTA` (e.g. 0.09,0.3) instead of exact verification when
    /// sampling: more tokens accepted, but NOT lossless (greedy decoding stays exact).
    #[arg(long)]
    pub typical: Option<augur_decode::speculative::Typical>,
    /// The prompt text.
    pub prompt: Option<String>,
}

fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, logits[i as usize])).collect()
}

pub fn main(a: Args) -> Result<()> {
    if let Some(dir) = a.model.model.as_deref().filter(|d| crate::run_gpt::is_checkpoint(d)) {
        return crate::run_gpt::main(dir, &a);
    }
    let model = a.model.load()?;
    let prompt: Vec<u32> = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), None) => {
            model.tokenizer.check_ids(ids)?;
            ids.clone()
        }
        (Some(_), Some(_)) => bail!("give either PROMPT or --prompt-ids, not both"),
        (None, Some(text)) if a.chat => {
            let tpl = ChatTemplate::for_model(&model)?;
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", text));
            model.tokenizer.encode(&tpl.render(&msgs, true)?)?
        }
        (None, Some(text)) => model.tokenizer.encode(text)?,
        (None, None) => bail!("no prompt: give PROMPT text or --prompt-ids"),
    };
    let room = model.llama.cfg.context.saturating_sub(prompt.len());
    let max_tokens = a.max_tokens.unwrap_or(256.min(room));
    // Only `--json --top-logits K` reads the logits.
    let ids_only = !(a.json && a.top_logits > 0);
    let cfg = GenerateConfig { max_tokens, sampler: a.sample.config(), stop: a.stop.clone(), ignore_eos: a.ignore_eos, activations: a.precision.get(), ids_only };
    if a.spec.is_some() && model.llama.device_name().is_some() {
        eprintln!("augur: note: on a CUDA device, speculative verification runs on the multi-launch pass (a pass over 8 tokens costs 2.7 single-token ones there), so it is slower than plain greedy decoding, which keeps the argmax on the device");
    }
    let mut drafter = match a.spec.as_deref() {
        None => None,
        Some(s) => Some(a.draft.drafter(s, &model)?),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut io_err = None;
    let on_token = |ev: &TokenEvent| {
        let r = if a.json {
            let top: Vec<_> = top_k(ev.logits, a.top_logits).into_iter().map(|(i, l)| json!([i, l])).collect();
            writeln!(out, "{}", json!({"pos": ev.pos, "token": ev.id, "text": ev.text, "top": top}))
        } else {
            write!(out, "{}", ev.text).and_then(|_| out.flush())
        };
        match r {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                io_err = Some(e);
                ControlFlow::Break(())
            }
        }
    };
    let (summary, spec) = match drafter.as_deref_mut() {
        None => (generate(&model, &prompt, &cfg, on_token)?, None),
        Some(d) => {
            let spec = SpecConfig { typical: a.typical, ..a.draft.config() };
            let (s, st) = speculative::generate(&model, &prompt, &cfg, &spec, d, on_token)?;
            (s, Some(st))
        }
    };
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    let stop = match summary.stop {
        StopReason::Eos => "eos",
        StopReason::StopString => "stop_string",
        StopReason::MaxTokens => "max_tokens",
        StopReason::Callback => "interrupted",
    };
    // With speculation every generated token comes from the decode loop.
    let decode_tok_per_s = match &spec {
        None => summary.decode_tok_per_s(),
        Some(_) => summary.generated.len() as f64 / summary.decode.as_secs_f64().max(1e-9),
    };
    if a.json {
        let mut s = json!({
                "prompt_tokens": summary.prompt_tokens,
                "generated_tokens": summary.generated.len(),
                "prefill_tok_per_s": summary.prefill_tok_per_s(),
                "decode_tok_per_s": decode_tok_per_s,
                "prefill_s": summary.prefill.as_secs_f64(),
                "decode_s": summary.decode.as_secs_f64(),
                "stop_reason": stop,
                "threads": augur_kernels::pool::global().threads(),
        });
        if let Some(st) = &spec {
            s["spec"] = spec_json(st);
        }
        writeln!(out, "{}", json!({ "summary": s }))?;
    } else {
        writeln!(out)?;
        if summary.generated.len() == 1 && summary.stop == StopReason::Eos && !a.chat {
            // The one token is the end-of-sequence token: an empty line alone would look like a failure.
            eprintln!("augur: the model ended the text at once (its end-of-sequence token came first); an instruction-tuned model may need --chat");
        }
    }
    if a.stats {
        eprintln!(
            "prompt {} tokens, {:.1} tok/s prefill; generated {} tokens, {:.1} tok/s decode; stop: {stop}",
            summary.prompt_tokens,
            summary.prefill_tok_per_s(),
            summary.generated.len(),
            decode_tok_per_s
        );
        if let Some(st) = &spec {
            eprintln!("speculation: {}", spec_json(st));
        }
    }
    Ok(())
}

pub fn spec_json(st: &SpecStats) -> serde_json::Value {
    let r = |v: f64| (v * 1000.0).round() / 1000.0;
    json!({
        "tau": r(st.tau()),
        "accept_rate_by_pos": st.accept_rate_by_pos().into_iter().map(r).collect::<Vec<_>>(),
        "target_passes": st.target_passes,
        "drafted": st.drafted,
        "emitted": st.emitted,
        "draft_s": r(st.draft_time.as_secs_f64()),
        "target_s": r(st.target_time.as_secs_f64()),
    })
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_orders_by_logit_then_id() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![(1, 3.0), (2, 3.0), (3, 2.0)]);
        assert_eq!(top_k(&[1.0], 5).len(), 1);
        assert!(top_k(&[1.0], 0).is_empty());
    }
}
