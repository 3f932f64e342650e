//! The training loop behind `augur train`: a token corpus split into training and held-out
//! parts, random windows as batches, AdamW with warm-up + cosine, optional autocast and loss
//! scaling, periodic held-out perplexity, and resumable checkpoints.
//!
//! A checkpoint directory holds `model.safetensors` (parameters), `config.json` (the
//! [`GptConfig`]), `optimizer.safetensors` and `trainer.json` (step, data RNG, loss scale, the
//! settings). Every file is written beside its target and renamed into place, so an interrupted
//! save never leaves a torn checkpoint, and resuming continues exactly where the run stopped.

use std::path::Path;

use augur_core::{no_grad, DType};
use augur_formats::safetensors::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::amp::{autocast, GradScaler};
use crate::dist::{Ddp, ProcessGroup, Solo};
use crate::error::{invalid, Error, Result};
use crate::gpt::{Gpt, GptConfig};
use crate::module::{Module, ModuleExt};
use crate::optim::{clip_grad_norm, AdamW, LrSchedule, Optimizer};
use crate::rng::Rng;

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate (cosine decay).
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient clipping by global norm (0 = off).
    pub clip: f64,
    /// `None` (f32), `Some(BF16)` or `Some(F16)` autocast.
    pub precision: Option<String>,
    /// Held-out evaluation every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Windows averaged per evaluation.
    pub eval_windows: usize,
    /// Seed of the batch sampling.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings { batch: 8, seq_len: 256, steps: 1000, lr: 1e-3, min_lr: 1e-4, warmup: 50, weight_decay: 0.1, clip: 1.0, precision: None, eval_every: 100, eval_windows: 16, seed: 0 }
    }
}

impl TrainSettings {
    /// The autocast dtype the precision setting asks for (`None` for f32).
    pub fn autocast(&self) -> Result<Option<DType>> {
        match self.precision.as_deref() {
            None | Some("f32") => Ok(None),
            Some("bf16") => Ok(Some(DType::BF16)),
            Some("f16") => Ok(Some(DType::F16)),
            Some(p) => invalid(format!("precision `{p}` is not f32, bf16 or f16")),
        }
    }
}

/// A tokenized corpus: the last `held_out` fraction is kept for evaluation.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Training tokens.
    pub train: Vec<u32>,
    /// Held-out tokens.
    pub valid: Vec<u32>,
}

impl Corpus {
    /// The last `held_out` share of `tokens` held out (an error if either part is too small).
    pub fn split(tokens: Vec<u32>, held_out: f64) -> Result<Self> {
        let cut = ((tokens.len() as f64) * (1.0 - held_out)) as usize;
        let mut train = tokens;
        let valid = train.split_off(cut);
        Ok(Corpus { train, valid })
    }

    /// `batch` random windows of `seq + 1` tokens from `part`, as inputs and next-token targets.
    pub fn batch(part: &[u32], batch: usize, seq: usize, rng: &mut Rng) -> Result<(Vec<u32>, Vec<u32>)> {
        if part.len() <= seq + 1 {
            return invalid(format!("the corpus part has {} tokens; a window of {} needs more (use more text or a shorter --seq-len)", part.len(), seq + 1));
        }
        let (mut x, mut y) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
        for _ in 0..batch {
            let s = rng.below(part.len() - seq - 1);
            x.extend_from_slice(&part[s..s + seq]);
            y.extend_from_slice(&part[s + 1..s + seq + 1]);
        }
        Ok((x, y))
    }
}

/// What one step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Step number (1-based).
    pub step: usize,
    /// Training loss.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The step was skipped (overflow under f16 loss scaling).
    pub skipped: bool,
}

/// The resumable part of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    data_rng: Rng,
    loss_scale: f64,
    settings: TrainSettings,
}

/// A model, its optimizer and the run's position.
pub struct Trainer {
    /// The model being trained.
    pub model: Gpt,
    /// How it is trained.
    pub settings: TrainSettings,
    opt: AdamW,
    scaler: GradScaler,
    sched: LrSchedule,
    rng: Rng,
    /// Steps taken so far.
    pub step: usize,
}

impl Trainer {
    /// A fresh model and optimizer.
    pub fn new(config: GptConfig, settings: TrainSettings) -> Result<Self> {
        let model = Gpt::new(config)?;
        Self::with_model(model, settings)
    }

    fn with_model(model: Gpt, settings: TrainSettings) -> Result<Self> {
        if settings.batch == 0 || settings.seq_len == 0 {
            return invalid("batch and seq_len must be positive");
        }
        let sched = LrSchedule { base_lr: settings.lr, min_lr: settings.min_lr, warmup: settings.warmup, total: settings.steps };
        let precision = settings.autocast()?;
        Ok(Trainer {
            opt: AdamW::new(settings.lr, (0.9, 0.95), 1e-8, settings.weight_decay),
            scaler: GradScaler::for_precision(precision),
            rng: Rng::new(settings.seed ^ 0xDA7A),
            sched,
            model,
            settings,
            step: 0,
        })
    }

    /// Move the model (and the optimizer's moments, at their next step) to `dev`, or back to
    /// host memory for `None`.
    pub fn to_device(&mut self, dev: Option<augur_core::Device>) -> Result<()> {
        self.model.to_device(dev.as_ref())?;
        if dev.is_none() {
            self.opt.moments_to_host()?;
        }
        Ok(())
    }

    /// One optimisation step on a fresh random batch.
    pub fn step(&mut self, corpus: &Corpus) -> Result<StepReport> {
        self.step_parallel(corpus, &Solo)
    }

    /// One data-parallel step: the ranks draw the same global batch of `batch × world` windows,
    /// each trains on its own `batch` of them, and gradients are averaged across ranks during the
    /// backward pass; every rank then takes the same optimizer step (or all skip it).
    pub fn step_parallel(&mut self, corpus: &Corpus, group: &dyn ProcessGroup) -> Result<StepReport> {
        let s = &self.settings;
        let (x, y) = Corpus::batch(&corpus.train, s.batch * group.world(), s.seq_len, &mut self.rng)?;
        let shard = s.batch * s.seq_len;
        let r = group.rank() * shard..(group.rank() + 1) * shard;
        let (x, y) = (&x[r.clone()], &y[r]);
        let precision = s.autocast()?;
        let loss = autocast(precision, || self.model.loss(x, y, s.batch))??;
        let scaled = self.scaler.scale_loss(&loss)?;
        if group.world() > 1 {
            Ddp::new(group).backward(&scaled, &mut self.model)?;
        } else {
            scaled.backward()?;
        }
        let mut found_inf = self.scaler.unscale(&mut self.model)?;
        // Without loss scaling no rank can find an overflow: no flag to agree on (and no wait
        // for the gradients' collectives before the optimizer step is queued).
        if group.world() > 1 && self.scaler.enabled {
            let mut flag = [if found_inf { 1.0 } else { 0.0 }];
            group.all_reduce_sum(&mut flag);
            found_inf = flag[0] > 0.0;
        }
        let grad_norm = if found_inf { f64::INFINITY } else { clip_grad_norm(&mut self.model, s.clip)? };
        let lr = self.sched.at(self.step);
        self.opt.set_lr(lr);
        let stepped = self.scaler.step(&mut self.opt, &mut self.model, found_inf)?;
        self.model.zero_grad();
        self.step += 1;
        Ok(StepReport { step: self.step, loss: loss.item()?, lr, grad_norm, skipped: !stepped })
    }

    /// Mean held-out loss over `eval_windows` windows drawn from a fixed seed (the same windows
    /// every time, so evaluations are comparable).
    pub fn evaluate(&self, corpus: &Corpus, seq_len: usize) -> Result<f64> {
        let mut rng = Rng::new(0xE7A1);
        let mut total = 0.0;
        let n = self.settings.eval_windows.max(1);
        no_grad(|| -> Result<()> {
            for _ in 0..n {
                let (x, y) = Corpus::batch(&corpus.valid, 1, seq_len, &mut rng)?;
                total += self.model.loss(&x, &y, 1)?.item()? as f64;
            }
            Ok(())
        })?;
        Ok(total / n as f64)
    }

    /// Write a complete checkpoint into `dir` (created if needed).
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|err| Error::Io { path: dir.into(), err })?;
        self.model.save(&dir.join("model.safetensors"))?;
        let state = self.opt.state();
        let refs: Vec<(&str, &augur_core::Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        augur_formats::safetensors::save(&dir.join("optimizer.safetensors"), &refs)?;
        write_json(&dir.join("config.json"), &self.model.config)?;
        let st = TrainerState { step: self.step, data_rng: self.rng.clone(), loss_scale: self.scaler.scale, settings: self.settings.clone() };
        write_json(&dir.join("trainer.json"), &st)
    }

    /// Continue the run saved in `dir`; `steps` may extend its schedule's length.
    pub fn resume(dir: &Path, steps: Option<usize>) -> Result<Self> {
        let config = GptConfig::from_file(&dir.join("config.json"))?;
        let st: TrainerState = read_json(&dir.join("trainer.json"))?;
        let mut model = Gpt::new(config)?;
        model.load(&dir.join("model.safetensors"))?;
        let mut settings = st.settings;
        if let Some(s) = steps {
            settings.steps = s;
        }
        let mut t = Self::with_model(model, settings)?;
        t.opt.load_state(&Checkpoint::open(&dir.join("optimizer.safetensors"))?)?;
        t.rng = st.data_rng;
        t.scaler.scale = st.loss_scale;
        t.step = st.step;
        Ok(t)
    }
}

/// Load a trained model for inference from a checkpoint directory.
pub fn load_model(dir: &Path) -> Result<Gpt> {
    let mut m = Gpt::new(GptConfig::from_file(&dir.join("config.json"))?)?;
    m.load(&dir.join("model.safetensors"))?;
    m.freeze();
    m.set_training(false);
    Ok(m)
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("json.partial");
    let text = serde_json::to_string_pretty(v).map_err(|err| Error::Json { path: path.into(), err })?;
    std::fs::write(&tmp, text + "\n").map_err(|err| Error::Io { path: tmp.clone(), err })?;
    std::fs::rename(&tmp, path).map_err(|err| Error::Io { path: path.into(), err })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io { path: path.into(), err })?;
    serde_json::from_str(&text).map_err(|err| Error::Json { path: path.into(), err })
}
