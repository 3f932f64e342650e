//! `augur distill-data` (the target's own responses to a prompt set, optionally with its hidden
//! states), `augur train-medusa` (Medusa heads trained on them), `augur train-mtp` (MTP
//! modules) and `augur distill` (a draft model distilled on them).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use augur_distill::data::{self, DistillSet};
use augur_distill::draft::{self, DraftConfig};
use augur_distill::medusa::{self, MedusaConfig};
use augur_distill::mtp::{self, MtpConfig};

use crate::common::{progress_bar, ModelArgs, SampleArgs};

/// The model's hidden states of every sample, with a progress bar.
fn hidden_states(model: &augur_models::Model, samples: &[data::Sample]) -> Result<Vec<half::bf16>> {
    let b = progress_bar(samples.len(), "hidden");
    let h = data::hidden_states(&model.llama, samples, |i, _| b.set_position(i as u64))?;
    b.finish();
    Ok(h)
}

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt file (JSONL: `{"messages": [...]}` or `{"prompt": "..."}`, optional `group`).
    #[arg(long, default_value = "bench/distill/prompts.jsonl")]
    pub prompts: PathBuf,
    /// Output directory (`samples.jsonl`, `hidden.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    /// Most response tokens per prompt.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Also cache the target's final hidden states (what head training reads).
    #[arg(long)]
    pub hidden: bool,
    /// Only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub sample: SampleArgs,
}

pub fn data_main(a: DataArgs) -> Result<()> {
    let model = a.model.load()?;
    let prompts = data::load_prompts(&a.prompts, &model, a.limit)?;
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompts", a.prompts.display());
    let t0 = Instant::now();
    let b = progress_bar(prompts.len(), "responses");
    let samples = data::respond(&model, &prompts, a.max_tokens, a.sample.config(), |i, _| b.set_position(i as u64))?;
    b.finish();
    let tokens: usize = samples.iter().map(|s| s.ids.len() - s.prompt_len).sum();
    eprintln!("{} responses, {tokens} tokens in {:.0} s", samples.len(), t0.elapsed().as_secs_f64());
    let (hidden, dim) = if a.hidden { (Some(hidden_states(&model, &samples)?), model.llama.cfg.dim) } else { (None, 0) };
    DistillSet { samples, hidden, dim }.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!("{}", a.out.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MedusaArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data directory from `augur distill-data` (hidden states are computed if not cached).
    #[arg(long)]
    pub data: PathBuf,
    /// Output file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of heads (draft depth).
    #[arg(long, default_value_t = 3)]
    pub heads: usize,
    /// Residual blocks per head.
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Tokens the heads score (the most frequent of the data).
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
}

/// The model and its distillation data, with hidden states (computed when not cached).
fn model_and_states(model: &ModelArgs, data: &std::path::Path) -> Result<(augur_models::Model, DistillSet)> {
    let model = model.load()?;
    let mut set = DistillSet::open(data)?;
    if set.hidden.is_none() {
        set.hidden = Some(hidden_states(&model, &set.samples)?);
        set.dim = model.llama.cfg.dim;
    }
    Ok((model, set))
}

/// A progress callback for training that shows the step and `what` of the last step's loss.
fn show<'a>(b: &'a indicatif::ProgressBar, what: &'static str) -> impl FnMut(augur_distill::Progress) + 'a {
    move |p| {
        b.set_length(p.steps as u64);
        b.set_position(p.step as u64);
        b.set_message(format!("{what} {:.3}", p.loss));
    }
}

pub fn medusa_main(a: MedusaArgs) -> Result<()> {
    let (model, set) = model_and_states(&a.model, &a.data)?;
    // `--device cuda`: the model's forward passes and the heads' training both run there.
    let device = a.model.device.training()?;
    let cfg = MedusaConfig { heads: a.heads, layers: a.layers, vocab: a.vocab, epochs: a.epochs, batch: a.batch, lr: a.lr, device, ..Default::default() };
    let t0 = Instant::now();
    let b = progress_bar(0, "train");
    let trained = medusa::train(&model.llama, &set, &cfg, show(&b, "loss"))?;
    b.finish();
    let secs = t0.elapsed().as_secs_f64();
    let dim = model.llama.cfg.dim;
    augur_decode::speculative::medusa::save_heads(&a.out, &trained.heads, dim, &trained.vocab, &trained.accuracy).with_context(|| format!("writing {}", a.out.display()))?;
    let top1: Vec<String> = trained.accuracy.iter().map(|r| format!("{:.3}", r[0])).collect();
    let top5: Vec<String> = trained.accuracy.iter().map(|r| format!("{:.3}", r.iter().take(5).sum::<f32>())).collect();
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "train_seconds": secs,
            "positions": {"train": trained.positions.0, "held_out": trained.positions.1},
            "vocab_coverage": trained.coverage,
            "held_out_top1": top1,
            "held_out_top5": top5,
        })
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DraftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data directory from `augur distill-data`.
    #[arg(long)]
    pub data: PathBuf,
    /// Output file (GGUF, with the model's tokenizer).
    #[arg(long)]
    pub out: PathBuf,
    /// Blocks the draft keeps (the model's first ones).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Tokens of each sample used.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub accumulate: usize,
}

pub fn draft_main(a: DraftArgs) -> Result<()> {
    let model = a.model.load()?;
    let set = DistillSet::open(&a.data)?;
    // `--device cuda`: the target's forward passes and the draft's training both run there.
    let device = a.model.device.training()?;
    let cfg = DraftConfig { layers: a.layers, epochs: a.epochs, lr: a.lr, max_len: a.max_len, accumulate: a.accumulate, device, ..Default::default() };
    let t0 = Instant::now();
    let b = progress_bar(0, "distil");
    let mut trained = draft::train(&model, &set, &cfg, show(&b, "KL"))?;
    b.finish();
    let secs = t0.elapsed().as_secs_f64();
    draft::write_gguf(&model, &mut trained.gpt, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let eval = |e: &draft::Evaluation| serde_json::json!({"kl": e.kl, "top1_agreement": e.agreement, "positions": e.positions});
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "layers": a.layers,
            "train_seconds": secs,
            "train_positions_per_epoch": trained.train_positions,
            "held_out_before": eval(&trained.before),
            "held_out_after": eval(&trained.after),
        })
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MtpArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data directory from `augur distill-data` (hidden states are computed if not cached).
    #[arg(long)]
    pub data: PathBuf,
    /// Output file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Modules (draft depth).
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Tokens the head scores (the most frequent of the data).
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Tokens of each sample used.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub accumulate: usize,
}

pub fn mtp_main(a: MtpArgs) -> Result<()> {
    let (model, set) = model_and_states(&a.model, &a.data)?;
    let device = a.model.device.training()?;
    let cfg = MtpConfig { depth: a.depth, vocab: a.vocab, epochs: a.epochs, lr: a.lr, max_len: a.max_len, accumulate: a.accumulate, device, ..Default::default() };
    let t0 = Instant::now();
    let b = progress_bar(0, "train");
    let mut trained = mtp::train(&model, &set, &cfg, show(&b, "loss"))?;
    b.finish();
    let secs = t0.elapsed().as_secs_f64();
    trained.modules.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "depth": a.depth,
            "train_seconds": secs,
            "samples": {"train": trained.samples.0, "held_out": trained.samples.1},
            "held_out_top1_before": trained.before,
            "held_out_top1_after": trained.after,
        })
    );
    Ok(())
}
