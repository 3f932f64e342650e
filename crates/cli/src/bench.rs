//! `augur bench`: prefill and decode speed, median over runs, as JSON.
//!
//! Prefill times one forward pass over `--prompt-len` tokens (after `--depth` cached tokens);
//! decode times `--gen-len` single-token steps right after it. `--batches 1,2,4,8,16` also times
//! one forward pass of each batch size at the same depth (the cost of verifying that many
//! speculative tokens), rolled back after each.

use std::time::Instant;

use anyhow::{ensure, Result};
use augur_decode::sampler::argmax;
use augur_models::{Logits, State};
use serde_json::json;

use crate::common::{ModelArgs, PrecisionArgs};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub what: Option<What>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(long, short = 'p', default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, short = 'g', default_value_t = 128)]
    pub gen_len: usize,
    /// Tokens already in the KV cache before the timed prefill (untimed).
    #[arg(long, short = 'd', default_value_t = 0)]
    pub depth: usize,
    /// Also time single forward passes of these batch sizes at the depth.
    #[arg(long, value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Also measure memory read bandwidth over a buffer the size of the weights (the decode bound).
    #[arg(long)]
    pub bandwidth: bool,
    /// Time random weights of the default model's shape and block types (SmolLM2-135M: Q4_1
    /// blocks, Q8_0 embedding), written to a temporary file, instead of a model: the same speed
    /// with nothing to fetch (GPU machines without the model).
    #[arg(long, conflicts_with = "model")]
    pub synthetic: bool,
}

/// Benchmarks other than inference speed.
#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Training steps per second of a GPT (forward, backward, AdamW), as JSON.
    Train(crate::bench_train::TrainArgs),
    /// FlashAttention forward + backward: time and peak RSS at one sequence length.
    Attention(crate::bench_train::AttentionArgs),
    /// All-reduce time and bus bandwidth (run under `mpirun -np N`, MPI build).
    Allreduce(crate::bench_train::AllReduceArgs),
    /// FlashAttention on a CUDA device: forward and forward+backward TFLOP/s over sequence
    /// lengths, as JSON lines (a `--features cuda` build).
    Flash(crate::bench_gpu::FlashArgs),
}

/// Read bandwidth in GB/s over `bytes` bytes with the worker pool (best of 5 passes).
fn read_bandwidth(bytes: usize) -> f64 {
    let words = vec![1u64; bytes / 8];
    let pool = augur_kernels::pool::global();
    let mut best = 0f64;
    for _ in 0..5 {
        let total = std::sync::atomic::AtomicU64::new(0);
        let t = Instant::now();
        pool.for_chunks(words.len(), 1 << 16, &|r| {
            // Four independent accumulators so the loop is bound by loads, not by one add chain.
            let mut acc = [0u64; 4];
            for c in words[r].chunks_exact(4) {
                for i in 0..4 {
                    acc[i] = acc[i].wrapping_add(c[i]);
                }
            }
            total.fetch_add(acc.iter().sum(), std::sync::atomic::Ordering::Relaxed);
        });
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(total.into_inner());
    }
    best
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set size of this process in MiB (Linux), if known.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Decode rates of on-device greedy decoding (`[graph, persistent]`), one per run after a
/// warm-up, each on a fresh cache holding `prompt`.
type DeviceRates = [Vec<f64>; 2];

/// On a CUDA device: greedy decoding with the argmax on the device, by each decoder (the
/// captured step replayed as a graph; the persistent one-launch step), runs alternating.
#[cfg(feature = "cuda")]
fn device_decode(model: &augur_models::Model, prompt: &[u32], gen_len: usize, runs: usize) -> Result<Option<DeviceRates>> {
    use augur_cuda::Decoder;
    let Some(gpu) = model.llama.gpu() else { return Ok(None) };
    if gen_len < 2 {
        return Ok(None);
    }
    let mut rates: DeviceRates = Default::default();
    let decoders = [Decoder::Graph, Decoder::Persistent];
    for run in 0..=runs {
        for (i, &decoder) in decoders.iter().enumerate() {
            if decoder == Decoder::Persistent && gpu.decoder() != Decoder::Persistent {
                continue;
            }
            let mut seq = gpu.new_seq()?;
            let out = gpu.greedy_with(decoder, &mut seq, 0, prompt, gen_len, |_| true)?;
            if run > 0 {
                rates[i].push((out.tokens.len() - 1) as f64 / out.decode.as_secs_f64());
            }
        }
    }
    Ok(Some(rates))
}

#[cfg(not(feature = "cuda"))]
fn device_decode(_: &augur_models::Model, _: &[u32], _: usize, _: usize) -> Result<Option<DeviceRates>> {
    Ok(None)
}

pub fn main(a: Args) -> Result<()> {
    match a.what {
        Some(What::Train(t)) => return crate::bench_train::train(t),
        Some(What::Attention(t)) => return crate::bench_train::attention(t),
        Some(What::Allreduce(t)) => return crate::bench_train::allreduce(t),
        Some(What::Flash(t)) => return crate::bench_gpu::flash(t),
        None => {}
    }
    ensure!(a.runs > 0, "--runs must be at least 1");
    ensure!(a.prompt_len > 0, "--prompt-len must be at least 1");
    ensure!(!a.batches.contains(&0), "--batches sizes must be at least 1");
    let mut margs = a.model.clone();
    if a.synthetic {
        let path = std::env::temp_dir().join(format!("augur-synthetic-smollm2-135m-{}.gguf", std::process::id()));
        let (q4, q8) = (Some(augur_core::QuantType::Q4_1), Some(augur_core::QuantType::Q8_0));
        augur_models::tiny::write_gguf_config(&path, &augur_models::tiny::smollm2_135m_config(), q4, q8, 1)?;
        margs.model = Some(path);
    }
    let model = margs.load();
    if a.synthetic {
        std::fs::remove_file(margs.model.as_ref().expect("set above")).ok();
    }
    let model = model?;
    let cfg = &model.llama.cfg;
    let max_batch = a.batches.iter().copied().max().unwrap_or(0);
    let need = a.depth + (a.prompt_len + a.gen_len).max(max_batch);
    ensure!(need <= cfg.context, "depth + prompt-len + gen-len = {need} exceeds the context of {}", cfg.context);
    // A deterministic prompt of ordinary tokens (a tokenized sentence repeated to length).
    let text = model.tokenizer.encode("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg built a machine that changed how knowledge spread across Europe. ")?;
    let tokens: Vec<u32> = text.iter().copied().cycle().take(need).collect();
    let (ctx, prompt) = (&tokens[..a.depth], &tokens[a.depth..a.depth + a.prompt_len]);
    let mut st = State::new(cfg);
    st.activations = a.precision.get();
    st.reserve(cfg, need);
    if !ctx.is_empty() {
        model.llama.forward(&mut st, ctx, Logits::Last)?;
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut batch: Vec<Vec<f64>> = vec![Vec::new(); a.batches.len()];
    for run in 0..=a.runs {
        st.truncate(a.depth);
        let t0 = Instant::now();
        let mut next = argmax(model.llama.forward(&mut st, prompt, Logits::Last)?);
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..a.gen_len {
            next = argmax(model.llama.forward(&mut st, &[next], Logits::Last)?);
        }
        let td = t1.elapsed().as_secs_f64();
        for (i, &b) in a.batches.iter().enumerate() {
            st.truncate(a.depth);
            let t = Instant::now();
            model.llama.forward(&mut st, &tokens[a.depth..a.depth + b], Logits::All)?;
            if run > 0 {
                batch[i].push(b as f64 / t.elapsed().as_secs_f64());
            }
        }
        if run > 0 {
            prefill.push(a.prompt_len as f64 / tp);
            if a.gen_len > 0 {
                decode.push(a.gen_len as f64 / td);
            }
        }
    }
    let device = device_decode(&model, &tokens[..a.depth + a.prompt_len], a.gen_len, a.runs)?;
    let weight_bytes: usize = std::fs::metadata(&model.path).map(|m| m.len() as usize).unwrap_or(0);
    let bw = (a.bandwidth && weight_bytes > 0).then(|| read_bandwidth(weight_bytes));
    let r = |v: &[f64]| v.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>();
    let batches: serde_json::Map<String, serde_json::Value> =
        a.batches.iter().zip(&batch).map(|(b, v)| (b.to_string(), json!(median(v.clone())))).collect();
    println!(
        "{}",
        json!({
            "model": model.path.display().to_string(),
            "threads": augur_kernels::pool::global().threads(),
            "activations": format!("{:?}", a.precision.get()).to_lowercase(),
            "depth": a.depth,
            "prompt_len": a.prompt_len,
            "gen_len": a.gen_len,
            "runs": a.runs,
            "prefill_tok_per_s": median(prefill.clone()),
            "decode_tok_per_s": if decode.is_empty() { serde_json::Value::Null } else { json!(median(decode.clone())) },
            "batch_tok_per_s": batches,
            "prefill_runs": r(&prefill),
            "decode_runs": r(&decode),
            "peak_rss_mib": peak_rss_mib(),
            "read_bandwidth_gb_s": bw,
            "model_bytes": weight_bytes,
            "decode_bound_tok_per_s": bw.map(|b| b * 1e9 / weight_bytes as f64),
            "device": model.llama.device_name(),
            "decode_graph_tok_per_s": device.as_ref().map(|[g, _]| median(g.clone())),
            "decode_graph_runs": device.as_ref().map(|[g, _]| r(g)),
            "decode_persistent_tok_per_s": device.as_ref().filter(|[_, p]| !p.is_empty()).map(|[_, p]| median(p.clone())),
            "decode_persistent_runs": device.as_ref().map(|[_, p]| r(p)),
        })
    );
    Ok(())
}
