//! Define-by-run reverse-mode autograd.
//!
//! A tensor that requires a gradient carries a [`Meta`]: a leaf (created with
//! [`Tensor::requires_grad`]) accumulates its gradient; a computed tensor holds the node that made
//! it: its inputs and the closure that maps the output's gradient to theirs (the rules in
//! [`rules`]). [`Tensor::backward`] walks the nodes in reverse topological order, accumulates
//! into every leaf's `.grad()`, frees each intermediate gradient as soon as it is consumed and,
//! unless asked to keep it, frees each node's saved tensors after use. Inside [`no_grad`] nothing
//! is recorded.
//!
//! ```
//! use augur_core::Tensor;
//! let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3])?.requires_grad(true);
//! let y = x.mul(&x)?.sum_all()?; // Σ x²
//! y.backward()?;
//! assert_eq!(x.grad().unwrap().to_vec_f32()?, [2.0, 4.0, 6.0]);
//! # Ok::<(), augur_core::Error>(())
//! ```

pub(crate) mod rules;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{invalid, Error, Result};
use crate::Tensor;

/// Maps the output gradient to one optional gradient per input; `need[i]` says whether input `i`
/// wants one.
pub(crate) type BackwardFn = Box<dyn Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

pub(crate) struct Node {
    name: &'static str,
    inputs: Vec<Option<Arc<Meta>>>,
    backward: Mutex<Option<BackwardFn>>,
}

/// Autograd state of a tensor that requires a gradient.
pub struct Meta {
    id: usize,
    grad: Mutex<Option<Tensor>>,
    node: Option<Node>,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node {
            Some(n) => write!(f, "grad_fn={}", n.name),
            None => write!(f, "leaf"),
        }
    }
}

fn next_id() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Is recording on (false inside [`no_grad`])?
pub fn is_grad_enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Runs `f` with recording off: tensors computed inside have no graph.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = NoGradGuard::new();
    f()
}

/// Recording is off while this guard lives.
pub struct NoGradGuard(bool);

impl NoGradGuard {
    /// A guard that turns recording off until it is dropped (the scope form of [`no_grad`]).
    pub fn new() -> Self {
        NoGradGuard(ENABLED.with(|e| e.replace(false)))
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.0));
    }
}

/// Attach a node to `out` when recording is on and any input requires a gradient.
pub(crate) fn record(
    out: Tensor,
    name: &'static str,
    inputs: &[&Tensor],
    backward: impl Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    if !is_grad_enabled() || inputs.iter().all(|t| t.autograd.is_none()) {
        return out;
    }
    let node = Node {
        name,
        inputs: inputs.iter().map(|t| t.autograd.clone()).collect(),
        backward: Mutex::new(Some(Box::new(backward))),
    };
    Tensor { autograd: Some(Arc::new(Meta { id: next_id(), grad: Mutex::new(None), node: Some(node) })), ..out }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tensor {
    /// This tensor as a leaf that records the ops applied to it (`requires_grad = true`), or,
    /// with `false`, cut out of any graph.
    pub fn requires_grad(self, on: bool) -> Tensor {
        let autograd = on.then(|| Arc::new(Meta { id: next_id(), grad: Mutex::new(None), node: None }));
        Tensor { autograd, ..self }
    }

    /// Whether this tensor records the ops applied to it (a parameter, or a result computed from one).
    pub fn is_requires_grad(&self) -> bool {
        self.autograd.is_some()
    }

    /// True for tensors no recorded op produced.
    pub fn is_leaf(&self) -> bool {
        self.autograd.as_ref().is_none_or(|m| m.node.is_none())
    }

    /// The name of the op that produced this tensor, if it is in a graph.
    pub fn grad_fn(&self) -> Option<&'static str> {
        self.autograd.as_ref().and_then(|m| m.node.as_ref()).map(|n| n.name)
    }

    /// The same data outside the graph.
    pub fn detach(&self) -> Tensor {
        Tensor { autograd: None, ..self.clone() }
    }

    /// The gradient accumulated into this leaf by `backward` calls since the last `zero_grad`.
    pub fn grad(&self) -> Option<Tensor> {
        self.autograd.as_ref().and_then(|m| lock(&m.grad).clone())
    }

    /// Drop the accumulated gradient (the next backward starts from zero).
    pub fn zero_grad(&self) {
        if let Some(m) = &self.autograd {
            *lock(&m.grad) = None;
        }
    }

    /// Replace this leaf's gradient (gradient clipping, unscaling, all-reduce).
    pub fn set_grad(&self, g: Option<Tensor>) -> Result<()> {
        let Some(m) = &self.autograd else { return invalid("set_grad", "tensor does not require grad") };
        if let Some(g) = &g {
            if g.shape() != self.shape() {
                return Err(Error::ShapeMismatch { op: "set_grad", lhs: self.shape().to_vec(), rhs: g.shape().to_vec() });
            }
        }
        *lock(&m.grad) = g.map(|g| g.detach());
        Ok(())
    }

    /// Backpropagate from this one-element tensor (d self / d self = 1); frees the graph.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return invalid("backward", format!("needs a one-element tensor (a loss), got shape {:?}; use backward_with", self.shape()));
        }
        self.backward_with(self.full_like_device(self.shape(), 1.0)?, false)
    }

    /// Identity of this tensor's autograd node (shared by its clones), if it requires a gradient.
    pub fn grad_id(&self) -> Option<usize> {
        self.autograd.as_ref().map(|m| m.id)
    }

    /// Backpropagate `grad` (this tensor's shape); `retain_graph` keeps the saved tensors so a
    /// second backward through the same graph works.
    pub fn backward_with(&self, grad: Tensor, retain_graph: bool) -> Result<()> {
        self.backward_hooked(grad, retain_graph, &mut |_| {})
    }

    /// [`Tensor::backward_with`], calling `ready(grad_id)` as soon as a leaf's gradient is final
    /// (data-parallel training starts reducing it while the rest of the backward pass runs).
    pub fn backward_hooked(&self, grad: Tensor, retain_graph: bool, ready: &mut dyn FnMut(usize)) -> Result<()> {
        let Some(root) = &self.autograd else {
            return invalid("backward", "tensor does not require grad (no input had requires_grad, or it was computed under no_grad)");
        };
        if grad.shape() != self.shape() {
            return Err(Error::ShapeMismatch { op: "backward", lhs: self.shape().to_vec(), rhs: grad.shape().to_vec() });
        }
        let _off = NoGradGuard::new();
        let order = topological(root);
        let mut grads: HashMap<usize, Tensor> = HashMap::from([(root.id, grad)]);
        for meta in order.iter().rev() {
            let Some(g) = grads.remove(&meta.id) else { continue };
            let Some(node) = &meta.node else {
                {
                    let mut slot = lock(&meta.grad);
                    *slot = Some(match slot.take() {
                        Some(acc) => acc.add(&g)?,
                        None if g.dtype() == crate::DType::F64 => g,
                        None => crate::ops::to_dtype(&g, crate::DType::F32)?,
                    });
                }
                ready(meta.id);
                continue;
            };
            let mut f = lock(&node.backward);
            let Some(rule) = f.as_ref() else {
                return invalid("backward", format!("the graph through `{}` was freed by an earlier backward; pass retain_graph to backpropagate twice", node.name));
            };
            let need: Vec<bool> = node.inputs.iter().map(Option::is_some).collect();
            let input_grads = rule(&g, &need)?;
            if !retain_graph {
                *f = None;
            }
            for (input, ig) in node.inputs.iter().zip(input_grads) {
                let (Some(input), Some(ig)) = (input, ig) else { continue };
                let ig = match grads.remove(&input.id) {
                    Some(acc) => acc.add(&ig)?,
                    None => ig,
                };
                grads.insert(input.id, ig);
            }
        }
        Ok(())
    }
}

/// Every meta reachable from `root`, each after all the metas its node consumes.
fn topological(root: &Arc<Meta>) -> Vec<Arc<Meta>> {
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((m, expanded)) = stack.pop() {
        if expanded {
            order.push(m);
            continue;
        }
        if !seen.insert(m.id) {
            continue;
        }
        stack.push((m.clone(), true));
        if let Some(node) = &m.node {
            for input in node.inputs.iter().flatten() {
                if !seen.contains(&input.id) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}
