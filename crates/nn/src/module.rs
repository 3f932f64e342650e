//! [`Module`]: something that owns named parameters, and what every module can do with them.

use std::path::Path;

use augur_core::Tensor;

use crate::error::Result;

/// A layer or model: it owns parameters (leaf tensors that require gradients, or frozen tensors
/// that do not) and shows them to a visitor under dotted names.
pub trait Module {
    /// Calls `f` with each parameter's full name (`prefix` + its own dotted path) and the tensor.
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor));

    /// Switch between training (dropout active) and evaluation; containers pass it on.
    fn set_training(&mut self, _training: bool) {}
}

/// `prefix.name`, or `name` at the root.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// What every [`Module`] can do with its parameters.
pub trait ModuleExt: Module {
    /// `(name, tensor)` pairs in visit order; the tensors are the parameters themselves (a
    /// gradient set through one shows on the other).
    fn named_parameters(&mut self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        self.visit("", &mut |n, t| out.push((n.to_string(), t.clone())));
        out
    }

    /// Total number of parameter elements (frozen ones included).
    fn num_parameters(&mut self) -> usize {
        let mut n = 0;
        self.visit("", &mut |_, t| n += t.numel());
        n
    }

    /// Stop (or resume) computing gradients for every parameter.
    fn set_requires_grad(&mut self, on: bool) {
        self.visit("", &mut |_, t| {
            if t.is_requires_grad() != on && !t.dtype().is_quantized() {
                *t = t.detach().requires_grad(on);
            }
        });
    }

    /// Stop computing gradients for every parameter (e.g. a frozen base model).
    fn freeze(&mut self) {
        self.set_requires_grad(false);
    }

    /// Move every parameter to `dev` (host memory for `None`), keeping whether it requires a
    /// gradient; gradients are dropped.
    fn to_device(&mut self, dev: Option<&augur_core::Device>) -> Result<()> {
        let mut res = Ok(());
        self.visit("", &mut |_, t| {
            if res.is_ok() {
                res = t.detach().to(dev).map(|m| *t = m.detach().requires_grad(t.is_requires_grad()));
            }
        });
        Ok(res?)
    }

    /// Drop every parameter's gradient.
    fn zero_grad(&mut self) {
        self.visit("", &mut |_, t| t.zero_grad());
    }

    /// Write every parameter to a safetensors file under its name (atomically).
    fn save(&mut self, path: &Path) -> Result<()> {
        let params = self.named_parameters();
        let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        augur_formats::safetensors::save(path, &refs)?;
        Ok(())
    }

    /// Replace every parameter's values by the checkpoint's tensor of the same name; each
    /// parameter keeps whether it requires a gradient. Fails on a missing name or a shape change.
    fn load(&mut self, path: &Path) -> Result<()> {
        let ck = augur_formats::safetensors::Checkpoint::open(path)?;
        let mut err = None;
        self.visit("", &mut |name, t| {
            if err.is_some() {
                return;
            }
            let loaded = match ck.get(name) {
                Ok(l) => l,
                Err(e) => return err = Some(e.into()),
            };
            if loaded.shape() != t.shape() {
                return err = Some(crate::Error::Invalid(format!("{}: `{name}` has shape {:?} in the file, {:?} in the model", path.display(), loaded.shape(), t.shape())));
            }
            match loaded.to_dtype(augur_core::DType::F32) {
                Ok(v) => *t = v.requires_grad(t.is_requires_grad()),
                Err(e) => err = Some(e.into()),
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<M: Module + ?Sized> ModuleExt for M {}

impl<M: Module> Module for Vec<M> {
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (i, m) in self.iter_mut().enumerate() {
            m.visit(&join(prefix, &i.to_string()), f);
        }
    }
    fn set_training(&mut self, training: bool) {
        self.iter_mut().for_each(|m| m.set_training(training));
    }
}

/// A new parameter: `shape` filled by `init`, requiring a gradient.
pub fn parameter(shape: &[usize], init: impl FnMut() -> f64) -> Tensor {
    let mut init = init;
    let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| init() as f32).collect();
    Tensor::from_vec(v, shape).expect("length matches shape").requires_grad(true)
}

/// The parameters that hold a gradient (handles sharing it).
pub(crate) fn with_grads(model: &mut dyn Module) -> Vec<Tensor> {
    let mut out = vec![];
    model.visit("", &mut |_, p| {
        if p.grad().is_some() {
            out.push(p.clone());
        }
    });
    out
}
