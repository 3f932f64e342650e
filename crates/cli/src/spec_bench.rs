//! `augur spec-bench`: plain decoding and each drafter on a task set, per group: tau, tokens/s
//! and speedup over plain decoding (wall clock, same build, same threads, one run), plus the cost
//! of verifying b tokens relative to one decode step — what decides whether speculation pays.
//!
//! Tasks: `DIR/*.jsonl`, the file stem naming the group; each line `{"messages": [...]}` (rendered
//! with the model's chat template) or `{"prompt": "..."}` (raw text).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use augur_distill::data::{load_prompts, Prompt};
use augur_decode::speculative;
use augur_decode::{generate, GenerateConfig};
use augur_models::{Logits, State};
use serde_json::json;

use crate::common::{DraftArgs, ModelArgs, PrecisionArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Directory of task files (`GROUP.jsonl`).
    #[arg(long, default_value = "bench/tasks")]
    pub tasks: PathBuf,
    /// Drafters to compare with plain decoding (comma separated `--spec` values).
    #[arg(long, value_delimiter = ',', default_value = "prompt-lookup")]
    pub drafters: Vec<String>,
    /// Most tokens per task (generation also stops at EOS).
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub draft: DraftArgs,
    /// Only the first N tasks of each group.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Append each task's prompt and plain greedy output (token ids) to FILE as JSON lines, for
    /// offline study of drafters (`bench/lookup_bound.py`).
    #[arg(long, value_name = "FILE")]
    pub dump: Option<PathBuf>,
}

#[derive(Default, Clone)]
struct Tally {
    tokens: usize,
    secs: f64,
    passes: usize,
    mismatches: usize,
}

/// Every `*.jsonl` of the task directory, in name order; a line's group is its file's stem.
fn load_tasks(a: &Args, model: &augur_models::Model) -> Result<Vec<Prompt>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.tasks)
        .with_context(|| format!("reading task directory {}", a.tasks.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut tasks = Vec::new();
    for f in files {
        tasks.extend(load_prompts(&f, model, a.limit)?);
    }
    if tasks.is_empty() {
        bail!("no tasks found in {}", a.tasks.display());
    }
    Ok(tasks)
}

pub fn main(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let tasks = load_tasks(&a, &model)?;
    // Plain decoding at its fastest: on a GPU the argmax stays on the device.
    let cfg = GenerateConfig { max_tokens: a.max_tokens, activations: a.precision.get(), ids_only: true, ..Default::default() };
    let groups: Vec<String> = tasks.iter().fold(Vec::new(), |mut g, t| {
        if !g.contains(&t.group) {
            g.push(t.group.clone());
        }
        g
    });
    let names: Vec<String> = std::iter::once("plain".to_string()).chain(a.drafters.iter().cloned()).collect();
    // tally[group][method]
    let mut tally = vec![vec![Tally::default(); names.len()]; groups.len()];
    let mut dump = match &a.dump {
        Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening {}", p.display()))?),
        None => None,
    };
    for (ti, task) in tasks.iter().enumerate() {
        let g = groups.iter().position(|x| *x == task.group).unwrap();
        eprintln!("task {}/{} ({})", ti + 1, tasks.len(), task.group);
        let t = Instant::now();
        let plain = generate(&model, &task.ids, &cfg, |_| ControlFlow::Continue(()))?;
        let secs = t.elapsed().as_secs_f64() - plain.prefill.as_secs_f64();
        if let Some(f) = dump.as_mut() {
            use std::io::Write;
            writeln!(f, "{}", json!({"group": task.group, "prompt": task.ids, "out": plain.generated}))?;
        }
        let e = &mut tally[g][0];
        e.tokens += plain.generated.len();
        e.secs += secs;
        e.passes += plain.generated.len();
        for (di, spec) in a.drafters.iter().enumerate() {
            let mut d = a.draft.drafter(spec, &model)?;
            let (s, stats) = speculative::generate(&model, &task.ids, &cfg, &a.draft.config(), d.as_mut(), |_| ControlFlow::Continue(()))?;
            let e = &mut tally[g][di + 1];
            e.tokens += s.generated.len();
            e.secs += s.decode.as_secs_f64();
            e.passes += stats.target_passes;
            e.mismatches += (s.generated != plain.generated) as usize;
        }
    }
    let cost = verify_cost(&model, &cfg)?;
    let mut out = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let base = tally[g][0].tokens as f64 / tally[g][0].secs;
        for (m, name) in names.iter().enumerate() {
            let t = &tally[g][m];
            let tps = t.tokens as f64 / t.secs;
            out.push(json!({
                "group": group, "method": name, "tokens": t.tokens,
                "tau": t.tokens as f64 / t.passes.max(1) as f64,
                "tok_per_s": tps, "speedup": tps / base, "outputs_differing_from_plain": t.mismatches,
            }));
        }
    }
    if a.json {
        println!("{}", json!({"results": out, "verify_cost": cost, "threads": augur_kernels::pool::global().threads()}));
        return Ok(());
    }
    println!("| group | method | tau | tok/s | speedup | outputs ≠ plain |");
    println!("|---|---|---|---|---|---|");
    for r in &out {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.2}x | {} |",
            r["group"].as_str().unwrap(),
            r["method"].as_str().unwrap(),
            r["tau"].as_f64().unwrap(),
            r["tok_per_s"].as_f64().unwrap(),
            r["speedup"].as_f64().unwrap(),
            r["outputs_differing_from_plain"]
        );
    }
    println!("\nCost of one forward pass over b tokens at depth 256, in decode steps: {}", cost);
    Ok(())
}

/// Time of a forward pass over b tokens relative to one token, at depth 256 (median of 5).
fn verify_cost(model: &augur_models::Model, cfg: &GenerateConfig) -> Result<serde_json::Value> {
    let llama = &model.llama;
    let depth = 256.min(llama.cfg.context.saturating_sub(17));
    // Arbitrary ids inside the vocabulary (a tiny model's may hold only a few hundred).
    let vocab = llama.cfg.vocab as u32;
    let toks: Vec<u32> = (0..depth as u32 + 16).map(|i| (100 + i % 1000) % vocab).collect();
    let mut st = State::new(&llama.cfg);
    st.activations = cfg.activations;
    llama.forward(&mut st, &toks[..depth], Logits::Last)?;
    let mut time = |b: usize| -> Result<f64> {
        let mut v = Vec::new();
        for _ in 0..6 {
            st.truncate(depth);
            let t = Instant::now();
            llama.forward(&mut st, &toks[depth..depth + b], Logits::All)?;
            v.push(t.elapsed().as_secs_f64());
        }
        v.sort_by(f64::total_cmp);
        Ok(v[3])
    };
    let one = time(1)?;
    let mut m = serde_json::Map::new();
    for b in [1, 2, 4, 8, 16] {
        m.insert(b.to_string(), json!((time(b)? / one * 100.0).round() / 100.0));
    }
    Ok(serde_json::Value::Object(m))
}
