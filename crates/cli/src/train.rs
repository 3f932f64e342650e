//! `augur train`: train a GPT from scratch on text, with progress, held-out perplexity and
//! resumable checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use augur_formats::tokenizer::Tokenizer;
use augur_nn::posenc::PosKind;
use augur_nn::train::{Corpus, TrainSettings, Trainer};
use augur_nn::GptConfig;
use indicatif::ProgressBar;

use crate::bench_train::set_train_threads;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Text files or directories (every file inside, recursively). Default: the Python standard
    /// library's source on this machine (no download needed).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Model: a preset (tiny, small) or a GPT config JSON file.
    #[arg(long, default_value = "small")]
    pub config: String,
    /// Positional encoding: rope, alibi, sinusoidal, learned, t5, none (default: the config's).
    #[arg(long)]
    pub pos: Option<PosKind>,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// f32, bf16 or f16 (autocast; f16 turns on loss scaling).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Checkpoint directory.
    #[arg(long, default_value = "augur-train-out")]
    pub out: PathBuf,
    /// Continue the run saved in this directory (same optimizer state, data position and RNG).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Held-out evaluation (and a checkpoint) every N steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Reuse a model's tokenizer (a .gguf file or a tokenizer.json) instead of bytes.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Read at most this many bytes of text.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_bytes: usize,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data-parallel training: each rank trains on `--batch` windows of every step and gradients
    /// are averaged. `--ddp` or `--ddp mpi`: run under `mpirun -np N` (a `--features mpi` build);
    /// `--ddp nccl`: NCCL between processes, one GPU each, started with `--nproc N` or by
    /// `mpirun -np N` (a `--features cuda` build).
    #[arg(long, num_args = 0..=1, default_missing_value = "mpi", value_name = "BACKEND")]
    pub ddp: Option<String>,
    /// Start N ranks of this command (with `--ddp nccl`).
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Where the model trains: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`);
    /// with `--ddp nccl`, rank r takes `cuda:r`.
    #[arg(long, default_value = "cpu")]
    pub device: crate::common::DeviceArg,
}

/// The process group for this run: `mpi` (MPI's world), `nccl` (the ranks `--nproc` started),
/// or a world of one without `--ddp`.
pub fn process_group(ddp: Option<&str>) -> Result<Box<dyn augur_dist::ProcessGroup>> {
    match ddp {
        None => Ok(Box::new(augur_dist::Solo)),
        Some("mpi") => mpi_group(),
        Some("nccl") => nccl_group(),
        Some(other) => bail!("--ddp {other}: use mpi or nccl"),
    }
}

fn mpi_group() -> Result<Box<dyn augur_dist::ProcessGroup>> {
    #[cfg(feature = "mpi")]
    {
        let g = augur_dist::mpi_group::MpiGroup::init().context("MPI could not be initialised with serialized threading")?;
        Ok(Box::new(g))
    }
    #[cfg(not(feature = "mpi"))]
    bail!("this augur was built without MPI; rebuild with `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)")
}

fn nccl_group() -> Result<Box<dyn augur_dist::ProcessGroup>> {
    #[cfg(feature = "cuda")]
    {
        let g = augur_dist::nccl_group::NcclGroup::from_env().context("joining the NCCL run")?;
        Ok(Box::new(g))
    }
    #[cfg(not(feature = "cuda"))]
    bail!("--ddp nccl: this augur was built without CUDA; rebuild with `cargo build --release --features cuda`")
}

/// `--nproc N` given to this process (not to a rank it started): start the ranks and wait.
/// Returns false when this process is itself a rank (or no launch was asked for).
pub fn launch(ddp: Option<&str>, nproc: Option<usize>) -> Result<bool> {
    let Some(n) = nproc else { return Ok(false) };
    ensure!(ddp == Some("nccl"), "--nproc starts NCCL ranks: add --ddp nccl (MPI runs start with mpirun -np N)");
    ensure!(std::env::var_os("AUGUR_RANK").is_none(), "--nproc inside a rank: the launcher removes it from the ranks' arguments");
    crate::launch::spawn_ranks(n)?;
    Ok(true)
}

/// The Python standard library's source directory, found by asking python3.
pub fn default_corpus() -> Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .context("the default corpus is the Python standard library, but python3 could not be run; pass --data FILE")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ensure!(p.is_dir(), "python3 reported {} as its standard library, which is not a directory; pass --data FILE", p.display());
    Ok(p)
}

/// Text of the files under `paths` (sorted, for reproducibility), up to `max` bytes.
pub fn read_text(paths: &[PathBuf], max: usize, py_only: bool) -> Result<String> {
    let mut files = vec![];
    fn walk(p: &Path, out: &mut Vec<PathBuf>, py_only: bool) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                walk(&e, out, py_only)?;
            }
        } else if !py_only || p.extension().is_some_and(|e| e == "py") {
            out.push(p.to_owned());
        }
        Ok(())
    }
    for p in paths {
        ensure!(p.exists(), "{} does not exist", p.display());
        walk(p, &mut files, py_only)?;
    }
    let mut text = String::new();
    for f in files {
        if text.len() >= max {
            break;
        }
        if let Ok(t) = std::fs::read_to_string(&f) {
            text.push_str(&t);
            text.push('\n');
        }
    }
    text.truncate(text.floor_char_boundary(max));
    ensure!(!text.is_empty(), "no readable text in {paths:?}");
    Ok(text)
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let g = augur_formats::gguf::Gguf::open(path)?;
        Ok(Tokenizer::from_gguf(&g)?)
    } else {
        Ok(Tokenizer::from_file(path)?)
    }
}

pub fn main(a: Args) -> Result<()> {
    if launch(a.ddp.as_deref(), a.nproc)? {
        return Ok(());
    }
    set_train_threads(a.threads)?;
    let group = process_group(a.ddp.as_deref())?;
    let lead = group.rank() == 0;
    let (paths, py_only) = if a.data.is_empty() { (vec![default_corpus()?], true) } else { (a.data.clone(), false) };
    let text = read_text(&paths, a.max_bytes, py_only)?;
    let tokenizer = a.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let tokens: Vec<u32> = match &tokenizer {
        Some(t) => t.encode(&text)?,
        None => text.bytes().map(u32::from).collect(),
    };
    let corpus = Corpus::split(tokens, 0.05)?;
    if lead {
        eprintln!("corpus: {} bytes of text from {} path(s), {} training and {} held-out tokens", text.len(), paths.len(), corpus.train.len(), corpus.valid.len());
    }
    let mut trainer = match &a.resume {
        Some(dir) => Trainer::resume(dir, Some(a.steps)).with_context(|| format!("resuming from {}", dir.display()))?,
        None => {
            let mut cfg = GptConfig::from_arg(&a.config)?;
            if let Some(p) = a.pos {
                cfg.pos = p;
            }
            cfg.vocab = tokenizer.as_ref().map_or(256, Tokenizer::vocab_size);
            cfg.max_seq = cfg.max_seq.max(a.seq_len);
            cfg.seed = a.seed;
            let settings = TrainSettings { batch: a.batch, seq_len: a.seq_len, steps: a.steps, lr: a.lr, min_lr: a.lr / 10.0, warmup: (a.steps / 20).clamp(1, 200), precision: Some(a.precision.clone()), eval_every: a.eval_every, seed: a.seed, ..TrainSettings::default() };
            Trainer::new(cfg, settings)?
        }
    };
    augur_dist::Ddp::new(group.as_ref()).broadcast_parameters(&mut trainer.model)?;
    trainer.to_device(a.device.of_rank(a.ddp.as_deref(), group.rank()).training()?)?;
    if trainer.step >= trainer.settings.steps {
        bail!("the run is already at step {} of {}; pass a larger --steps to continue", trainer.step, trainer.settings.steps);
    }
    let out = a.resume.clone().unwrap_or(a.out.clone());
    if let Some(t) = tokenizer.as_ref().filter(|_| lead) {
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("tokenizer.json"), t.to_json()?)?;
    }
    let s = trainer.settings.clone();
    let bar = if lead { crate::common::progress_bar(s.steps, "") } else { ProgressBar::hidden() }.with_position(trainer.step as u64);
    let t0 = Instant::now();
    let start = trainer.step;
    while trainer.step < s.steps {
        let r = trainer.step_parallel(&corpus, group.as_ref())?;
        let tps = ((trainer.step - start) * s.batch * s.seq_len * group.world()) as f64 / t0.elapsed().as_secs_f64();
        bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s{}", r.loss, r.lr, tps, if r.skipped { " (skipped: overflow)" } else { "" }));
        bar.inc(1);
        if (s.eval_every > 0 && trainer.step.is_multiple_of(s.eval_every)) || trainer.step == s.steps {
            let l = trainer.evaluate(&corpus, s.seq_len)?;
            if lead {
                let line = format!("step {}: train loss {:.4}, held-out loss {:.4}, perplexity {:.2}, {tps:.0} tok/s over {} rank(s)", trainer.step, r.loss, l, l.exp(), group.world());
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                trainer.save(&out)?;
            }
            group.barrier();
        }
    }
    bar.finish();
    if lead {
        eprintln!("checkpoint: {} (generate with `augur run -m {} \"PROMPT\"`)", out.display(), out.display());
    }
    Ok(())
}
