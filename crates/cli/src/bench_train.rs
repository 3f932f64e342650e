//! `augur bench train`: tokens/s of full training steps (forward, backward, AdamW) of a GPT, and
//! `augur bench attention`: time and peak RSS of a FlashAttention forward + backward.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use augur_core::{AttentionMask, DType, Tensor};
use augur_nn::amp::autocast;
use augur_nn::optim::{AdamW, Optimizer};
use augur_nn::{Gpt, GptConfig, ModuleExt, Rng};
use serde_json::json;

use crate::bench::{median, peak_rss_mib};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A preset (tiny, small) or a GPT config JSON file.
    #[arg(long, default_value = "small")]
    pub config: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// f32, or bf16/f16 autocast.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Where the step runs: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`);
    /// with `--ddp nccl`, rank r takes `cuda:r`.
    #[arg(long, default_value = "cpu")]
    pub device: crate::common::DeviceArg,
    /// Data-parallel steps, `--batch` windows per rank: `mpi` (under `mpirun -np N`) or `nccl`
    /// (with `--nproc N`, or under `mpirun -np N`). Tokens/s counts every rank's windows.
    #[arg(long, value_name = "BACKEND")]
    pub ddp: Option<String>,
    /// Start N ranks of this command (with `--ddp nccl`).
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Gradient bucket size in MiB for `--ddp`.
    #[arg(long, default_value_t = 25)]
    pub bucket_mib: usize,
}

/// The autocast dtype of a `--precision` value.
pub fn parse_precision(s: &str) -> Result<Option<DType>> {
    match s {
        "f32" => Ok(None),
        "bf16" => Ok(Some(DType::BF16)),
        "f16" => Ok(Some(DType::F16)),
        _ => anyhow::bail!("--precision must be f32, bf16 or f16, not `{s}`"),
    }
}

/// Size rayon's pool (used by the training ops) once per process, and keep freed memory in the
/// process: a training step allocates and frees the same large activation buffers every step, and
/// glibc otherwise returns them to the kernel (trim, or unmap above its mmap threshold), so each
/// step paid page faults and kernel page zeroing again (5% of a step's samples in `perf`).
pub fn set_train_threads(threads: Option<usize>) -> Result<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before the pools start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if let Some(t) = threads {
        ensure!(t > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("the thread pool is already running")?;
    }
    Ok(rayon::current_num_threads())
}

pub fn train(a: TrainArgs) -> Result<()> {
    ensure!(a.steps > 0 && a.batch > 0 && a.seq_len > 0 && a.bucket_mib > 0, "--steps, --batch, --seq-len and --bucket-mib must be positive");
    if crate::train::launch(a.ddp.as_deref(), a.nproc)? {
        return Ok(());
    }
    let threads = set_train_threads(a.threads)?;
    let precision = parse_precision(&a.precision)?;
    let group = crate::train::process_group(a.ddp.as_deref())?;
    let world = group.world();
    let ddp = augur_dist::Ddp { group: group.as_ref(), bucket_bytes: a.bucket_mib << 20 };
    let cfg = GptConfig::from_arg(&a.config)?;
    let mut model = Gpt::new(cfg.clone())?;
    let params = model.num_parameters();
    ddp.broadcast_parameters(&mut model)?;
    let dev = a.device.of_rank(a.ddp.as_deref(), group.rank()).training()?;
    model.to_device(dev.as_ref())?;
    let mut opt = AdamW::new(3e-4, (0.9, 0.95), 1e-8, 0.1);
    // Each rank its own windows.
    let mut rng = Rng::new(group.rank() as u64);
    let n = a.batch * a.seq_len;
    let mut times = vec![];
    let mut host = vec![];
    let mut loss = 0.0;
    for step in 0..=a.steps {
        let ids: Vec<u32> = (0..n).map(|_| rng.below(cfg.vocab) as u32).collect();
        let tgt: Vec<u32> = (0..n).map(|_| rng.below(cfg.vocab) as u32).collect();
        let t = Instant::now();
        let l = autocast(precision, || model.loss(&ids, &tgt, a.batch))??;
        if world > 1 {
            ddp.backward(&l, &mut model)?;
        } else {
            l.backward()?;
        }
        opt.step(&mut model)?;
        model.zero_grad();
        if step > 0 {
            host.push(t.elapsed().as_secs_f64());
        }
        // Reading the loss waits for a device's queued work, so the time is the whole step's.
        loss = l.item()?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        } else {
            // The warm-up step's one-time costs (uploads, cuBLAS and kernel loading) stay out of
            // the per-op profile.
            #[cfg(feature = "cuda")]
            augur_cuda::train::profile_report();
        }
    }
    let step_s = median(times);
    if group.rank() != 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    for (op, calls, secs) in augur_cuda::train::profile_report() {
        eprintln!("{op:>24} {calls:>7} calls {:>9.2} ms/step", secs * 1e3 / a.steps as f64);
    }
    println!(
        "{}",
        json!({
            "bench": "train",
            "config": a.config,
            "model": cfg,
            "parameters": params,
            "batch": a.batch,
            "seq_len": a.seq_len,
            "threads": threads,
            "device": dev.as_ref().map_or_else(|| "cpu".to_string(), |d| d.name()),
            "precision": a.precision,
            "steps": a.steps,
            "step_ms": step_s * 1e3,
            "host_ms": median(host) * 1e3,
            "ranks": world,
            "bucket_mib": (world > 1).then_some(a.bucket_mib),
            "tokens_per_s": (n * world) as f64 / step_s,
            "last_loss": loss,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AttentionArgs {
    /// Sequence length (queries = keys, causal).
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn attention(a: AttentionArgs) -> Result<()> {
    let threads = set_train_threads(a.threads)?;
    let before = peak_rss_mib();
    let mut rng = Rng::new(1);
    let mut mk = || -> Result<Tensor> {
        let n = a.heads * a.seq_len * a.head_dim;
        Ok(Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect(), &[1, a.heads, a.seq_len, a.head_dim])?.requires_grad(true))
    };
    let (q, k, v) = (mk()?, mk()?, mk()?);
    let inputs_mib = peak_rss_mib();
    let t = Instant::now();
    let out = Tensor::attention(&q, &k, &v, None, &AttentionMask { causal: true, ..Default::default() })?;
    let fwd = t.elapsed().as_secs_f64();
    out.sum_all()?.backward()?;
    let total = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "attention",
            "seq_len": a.seq_len,
            "heads": a.heads,
            "head_dim": a.head_dim,
            "threads": threads,
            "forward_ms": fwd * 1e3,
            "backward_ms": (total - fwd) * 1e3,
            "rss_before_mib": before,
            "rss_with_inputs_mib": inputs_mib,
            "peak_rss_mib": peak_rss_mib(),
            "score_matrix_would_be_mib": (a.heads * a.seq_len * a.seq_len * 4) as f64 / (1 << 20) as f64,
        })
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AllReduceArgs {
    /// Buffer size in MiB (DDP's bucket is 25).
    #[arg(long, default_value_t = 25.0)]
    pub mib: f64,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// `mpi` (host buffers, under `mpirun -np N`) or `nccl` (device buffers, one GPU per rank,
    /// started with `--nproc N`).
    #[arg(long, default_value = "mpi")]
    pub backend: String,
    /// Start N ranks of this command (with `--backend nccl`).
    #[arg(long)]
    pub nproc: Option<usize>,
    /// With `--backend nccl`: sizes in MiB to sweep (overrides `--mib`).
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<f64>,
}

/// All-reduce time and bus bandwidth over `mpirun -np N augur bench allreduce`, or over NCCL
/// ranks (`--backend nccl --nproc N`) on device buffers, as nccl-tests measures.
pub fn allreduce(a: AllReduceArgs) -> Result<()> {
    if crate::train::launch(Some(&a.backend), a.nproc)? {
        return Ok(());
    }
    if a.backend == "nccl" {
        return nccl_allreduce(&a);
    }
    let group = crate::train::process_group(Some(&a.backend))?;
    let n = ((a.mib * (1 << 20) as f64) / 4.0) as usize;
    let mut buf = vec![1.0f32; n];
    group.all_reduce_sum(&mut buf); // warm-up
    group.barrier();
    let mut times = vec![];
    for _ in 0..a.iters {
        group.barrier();
        let t = Instant::now();
        group.all_reduce_sum(&mut buf);
        times.push(t.elapsed().as_secs_f64());
    }
    if group.rank() == 0 {
        let w = group.world() as f64;
        let t = median(times);
        let bytes = (n * 4) as f64;
        println!("{}", json!({ "bench": "allreduce", "ranks": group.world(), "bytes": bytes, "median_ms": t * 1e3,
            "algorithm_gb_s": bytes / t / 1e9, "bus_gb_s": 2.0 * (w - 1.0) / w * bytes / t / 1e9 }));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn nccl_allreduce(a: &AllReduceArgs) -> Result<()> {
    let nccl = augur_cuda::Nccl::join(&augur_cuda::Place::from_env()?)?;
    let sizes = if a.sweep.is_empty() { vec![a.mib] } else { a.sweep.clone() };
    for mib in sizes {
        let bytes = ((mib * (1 << 20) as f64) as usize / 4).max(1) * 4;
        let t = nccl.time_all_reduce(bytes, a.iters)?;
        if nccl.rank() == 0 {
            println!("{}", json!({ "bench": "allreduce", "backend": "nccl", "device": nccl.device_name()?, "ranks": nccl.world(), "bytes": bytes,
                "median_ms": t * 1e3, "algorithm_gb_s": bytes as f64 / t / 1e9, "bus_gb_s": augur_cuda::bus_bandwidth(bytes, t, nccl.world()) / 1e9 }));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn nccl_allreduce(_: &AllReduceArgs) -> Result<()> {
    anyhow::bail!("--backend nccl: this augur was built without CUDA; rebuild with `cargo build --release --features cuda`")
}
