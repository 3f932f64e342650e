//! Mixed precision: the autocast scope (re-exported from the tensor core) and dynamic loss scaling.

pub use augur_core::amp::{autocast, autocast_dtype};
use augur_core::{DType, Tensor};

use crate::error::Result;
use crate::module::Module;
use crate::optim::Optimizer;

/// Dynamic loss scaling with PyTorch `GradScaler`'s semantics: the loss is multiplied by the
/// scale before backward; before the step the gradients are divided by it and checked; a step
/// with an inf/NaN gradient is skipped and the scale halves; after `growth_interval` finite steps
/// in a row it doubles. Off (scale 1, never skips) when disabled, as it should be with bf16.
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    /// Current loss scale.
    pub scale: f64,
    /// Factor applied after `growth_interval` finite steps (2).
    pub growth_factor: f64,
    /// Factor applied after an overflow (0.5).
    pub backoff_factor: f64,
    /// Consecutive finite steps before growing (2000).
    pub growth_interval: u32,
    /// Whether scaling is on (off for bf16 and f32).
    pub enabled: bool,
    tracker: u32,
}

impl GradScaler {
    /// Initial scale 2^16, ×2 after 2000 finite steps, ×0.5 on overflow.
    pub fn new(enabled: bool) -> Self {
        GradScaler { scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000, enabled, tracker: 0 }
    }

    /// The scaler a precision needs: on for f16, off for bf16 and f32.
    pub fn for_precision(dtype: Option<DType>) -> Self {
        Self::new(dtype == Some(DType::F16))
    }

    /// `loss · scale` (or `loss` when disabled): call backward on this.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(if self.enabled { loss.scale(self.scale)? } else { loss.clone() })
    }

    /// Divide every gradient by the scale; true when any is inf or NaN.
    pub fn unscale(&self, model: &mut dyn Module) -> Result<bool> {
        if !self.enabled {
            return Ok(false);
        }
        let inv = 1.0 / self.scale;
        let mut found_inf = false;
        // On a device, Σ 0·g is NaN exactly when some g is inf or NaN: one read for all.
        let mut on_dev: Option<Tensor> = None;
        for p in crate::module::with_grads(model) {
            let g = p.grad().expect("with_grads").scale(inv)?;
            if g.device().is_some() {
                let z = g.scale(0.0)?.sum_all()?;
                on_dev = Some(match on_dev {
                    Some(acc) => acc.add(&z)?,
                    None => z,
                });
            } else {
                found_inf |= g.to_vec_f32()?.iter().any(|v| !v.is_finite());
            }
            p.set_grad(Some(g))?;
        }
        if let Some(z) = on_dev {
            found_inf |= !z.item()?.is_finite();
        }
        Ok(found_inf)
    }

    /// Step the optimizer unless `found_inf`, then update the scale. Returns whether it stepped.
    /// (Under data parallelism, all-reduce `found_inf` first so every rank agrees.)
    pub fn step(&mut self, opt: &mut dyn Optimizer, model: &mut dyn Module, found_inf: bool) -> Result<bool> {
        if !found_inf {
            opt.step(model)?;
        }
        self.update(found_inf);
        Ok(!found_inf)
    }

    /// The scale update alone.
    pub fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.scale *= self.backoff_factor;
            self.tracker = 0;
        } else {
            self.tracker += 1;
            if self.tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_grows_after_the_interval_and_halves_on_overflow() {
        let mut s = GradScaler::new(true);
        s.growth_interval = 3;
        s.update(false);
        s.update(false);
        assert_eq!(s.scale, 65536.0);
        s.update(false);
        assert_eq!(s.scale, 131072.0);
        s.update(false);
        s.update(true);
        assert_eq!(s.scale, 65536.0);
        // The tracker restarted: two finite steps are not enough.
        s.update(false);
        s.update(false);
        assert_eq!(s.scale, 65536.0);
        let mut off = GradScaler::for_precision(Some(DType::BF16));
        off.update(true);
        assert_eq!((off.enabled, off.scale), (false, 65536.0));
    }
}
