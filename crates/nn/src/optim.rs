//! Optimizers (SGD with momentum, AdamW), learning-rate schedules and gradient clipping.
//! Updates are in place on f32 master weights, keyed by parameter name.

use std::collections::HashMap;

use augur_core::{AdamStep, Tensor};
use augur_formats::safetensors::Checkpoint;

use crate::error::{invalid, Result};
use crate::module::Module;

/// Something that updates a module's parameters from their gradients.
pub trait Optimizer {
    /// One update of every parameter that requires a gradient and has one.
    fn step(&mut self, model: &mut dyn Module) -> Result<()>;
    /// The current learning rate.
    fn lr(&self) -> f64;
    /// Set the learning rate (schedules call this each step).
    fn set_lr(&mut self, lr: f64);
    /// The optimizer's state as named tensors (for resumable checkpoints).
    fn state(&self) -> Vec<(String, Tensor)>;
    /// Restore what [`Optimizer::state`] wrote.
    fn load_state(&mut self, ck: &Checkpoint) -> Result<()>;
}

/// Per-parameter state vectors as named tensors (`prefix` + parameter name).
fn save_vectors(prefix: &str, m: &HashMap<String, Vec<f32>>) -> Vec<(String, Tensor)> {
    m.iter().map(|(n, v)| (format!("{prefix}{n}"), Tensor::from_vec(v.clone(), &[v.len()]).expect("1-d"))).collect()
}

/// The inverse of [`save_vectors`].
fn load_vectors(ck: &Checkpoint, prefix: &str) -> Result<HashMap<String, Vec<f32>>> {
    ck.names().filter_map(|n| n.strip_prefix(prefix).map(|p| (p.to_string(), n.to_string()))).map(|(p, n)| Ok((p, ck.get(&n)?.to_vec_f32()?))).collect()
}

/// Which parameters get weight decay: by default matrices and embeddings, not norms or biases.
pub fn decays(_name: &str, t: &Tensor) -> bool {
    t.rank() >= 2
}

/// Visit each trainable parameter with its gradient as f32.
fn for_each_grad(model: &mut dyn Module, mut f: impl FnMut(&str, &mut Tensor, &[f32]) -> Result<()>) -> Result<()> {
    let mut res = Ok(());
    model.visit("", &mut |name, p| {
        if res.is_err() || !p.is_requires_grad() {
            return;
        }
        let Some(g) = p.grad() else { return };
        if p.device().is_some() {
            return; // stepped on the device
        }
        res = match g.as_f32_slice() {
            Some(s) => f(name, p, s),
            None => g.to_vec_f32().map_err(Into::into).and_then(|g| f(name, p, &g)),
        };
    });
    res
}

/// SGD with momentum (PyTorch's form: `b = μb + g`, `p −= lr·b`) and L2 weight decay.
#[derive(Debug, Clone)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    buf: HashMap<String, Vec<f32>>,
}

impl Sgd {
    /// SGD with `momentum` and `weight_decay`.
    pub fn new(lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Sgd { lr, momentum, weight_decay, buf: HashMap::new() }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, model: &mut dyn Module) -> Result<()> {
        let mut on_dev = None;
        model.visit("", &mut |n, p| {
            if p.device().is_some() && p.is_requires_grad() {
                on_dev.get_or_insert_with(|| n.to_string());
            }
        });
        if let Some(n) = on_dev {
            return invalid(format!("SGD updates host parameters; `{n}` is on a device (train there with AdamW)"));
        }
        let (lr, mu, wd) = (self.lr as f32, self.momentum as f32, self.weight_decay as f32);
        let bufs = &mut self.buf;
        for_each_grad(model, |name, p, g| {
            let wd = if decays(name, p) { wd } else { 0.0 };
            let first = !bufs.contains_key(name);
            let b = bufs.entry(name.to_string()).or_insert_with(|| vec![0.0; g.len()]);
            let w = p.values_mut_f32()?;
            for i in 0..w.len() {
                let gi = g[i] + wd * w[i];
                b[i] = if first || mu == 0.0 { gi } else { mu * b[i] + gi };
                w[i] -= lr * if mu == 0.0 { gi } else { b[i] };
            }
            Ok(())
        })
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        save_vectors("sgd.momentum.", &self.buf)
    }
    fn load_state(&mut self, ck: &Checkpoint) -> Result<()> {
        self.buf = load_vectors(ck, "sgd.momentum.")?;
        Ok(())
    }
}

/// AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, computed as PyTorch does.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moment estimates.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (applied to weights that [`decays`] selects).
    pub weight_decay: f64,
    step: u64,
    m: HashMap<String, Vec<f32>>,
    v: HashMap<String, Vec<f32>>,
    /// The moments of parameters on a device, there (host state moves there at their first step).
    dev: HashMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// AdamW with PyTorch's defaults for the rest of its state.
    pub fn new(lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        AdamW { lr, betas, eps, weight_decay, step: 0, m: HashMap::new(), v: HashMap::new(), dev: HashMap::new() }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Bring the moments of device parameters back to host memory (for parameters moved back).
    pub fn moments_to_host(&mut self) -> Result<()> {
        for (n, (m, v)) in self.dev.drain() {
            self.m.insert(n.clone(), m.to_vec_f32()?);
            self.v.insert(n, v.to_vec_f32()?);
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, model: &mut dyn Module) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.betas.0 as f32, self.betas.1 as f32);
        let lr = self.lr as f32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let (eps, wd) = (self.eps as f32, self.weight_decay as f32);
        // One parameter's update: decoupled decay unless `decays` exempts it.
        let hyper = |name: &str, p: &Tensor| {
            let decay = if decays(name, p) { 1.0 - lr * wd } else { 1.0 };
            AdamStep { lr, betas: (b1, b2), eps, decay, bias1: bc1, bias2_sqrt: bc2_sqrt }
        };
        let (ms, vs) = (&mut self.m, &mut self.v);
        // Parameters on a device: one fused kernel each, moments kept there.
        let mut res = Ok(());
        let on_dev = &mut self.dev;
        model.visit("", &mut |name, p| {
            let (Some(dev), Some(g), true) = (p.device(), p.grad(), res.is_ok()) else { return };
            res = (|| -> Result<()> {
                if !on_dev.contains_key(name) {
                    let n = p.numel();
                    let host = |s: &mut HashMap<String, Vec<f32>>| s.remove(name).unwrap_or_else(|| vec![0.0; n]);
                    let (m, v) = (host(ms), host(vs));
                    let up = |x: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(x, &[n])?.to_device(&dev)?) };
                    on_dev.insert(name.to_string(), (up(m)?, up(v)?));
                }
                let (m, v) = &on_dev[name];
                Ok(p.adamw_device(&g, m, v, hyper(name, p))?)
            })();
        });
        res?;
        for_each_grad(model, |name, p, g| {
            let h = hyper(name, p);
            let m = ms.entry(name.to_string()).or_insert_with(|| vec![0.0; g.len()]);
            let v = vs.entry(name.to_string()).or_insert_with(|| vec![0.0; g.len()]);
            if m.len() != g.len() {
                return invalid(format!("AdamW state for `{name}` has {} values, the parameter {}", m.len(), g.len()));
            }
            h.apply(p.values_mut_f32()?, g, m, v);
            Ok(())
        })
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("adamw.step".to_string(), Tensor::from_f64(vec![self.step as f64], &[1]).expect("1"))];
        out.extend(save_vectors("adamw.m.", &self.m));
        out.extend(save_vectors("adamw.v.", &self.v));
        for (n, (m, v)) in &self.dev {
            out.push((format!("adamw.m.{n}"), m.clone()));
            out.push((format!("adamw.v.{n}"), v.clone()));
        }
        out
    }
    fn load_state(&mut self, ck: &Checkpoint) -> Result<()> {
        self.step = ck.get("adamw.step")?.to_vec_f64()?[0] as u64;
        self.m = load_vectors(ck, "adamw.m.")?;
        self.v = load_vectors(ck, "adamw.v.")?;
        self.dev.clear();
        Ok(())
    }
}

/// Linear warm-up to `base_lr` over `warmup` steps, then cosine decay to `min_lr` at `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
}

impl LrSchedule {
    /// The learning rate for (0-based) step `step`.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        if step >= self.total {
            return self.min_lr;
        }
        let p = (step - self.warmup) as f64 / (self.total - self.warmup).max(1) as f64;
        self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Scale every gradient so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm before.
pub fn clip_grad_norm(model: &mut dyn Module, max_norm: f64) -> Result<f64> {
    let grads = crate::module::with_grads(model);
    let mut sq = 0f64;
    // Device gradients add their squares up there: one read for all of them.
    let mut on_dev: Option<Tensor> = None;
    for p in &grads {
        let g = p.grad().expect("has grad");
        if g.device().is_some() {
            let s = g.to_dtype(augur_core::DType::F32)?.unary(augur_core::UnaryOp::Sqr)?.sum_all()?;
            on_dev = Some(match on_dev {
                Some(acc) => acc.add(&s)?,
                None => s,
            });
        } else {
            sq += g.to_vec_f32()?.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>();
        }
    }
    if let Some(s) = on_dev {
        sq += s.item()? as f64;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for p in &grads {
            let g = p.grad().expect("has grad");
            p.set_grad(Some(g.scale(coef)?))?;
        }
    }
    Ok(norm)
}
