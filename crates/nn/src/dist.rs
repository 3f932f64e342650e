//! Data parallelism: a [`ProcessGroup`] (rank, world size, all-reduce, broadcast, barrier) and
//! [`Ddp`], which averages gradients across ranks in buckets while the backward pass is still
//! running. Backends: [`Solo`] (one process) here, MPI in the `augur-dist` crate, NCCL later.

use std::collections::HashMap;
use std::sync::mpsc;

use augur_core::Tensor;

use crate::error::{invalid, Result};
use crate::module::Module;

/// A group of cooperating processes.
pub trait ProcessGroup: Send + Sync {
    /// This process's index, `0..world`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// `root`'s `buf` on every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize);
    /// Wait until every process reaches this point.
    fn barrier(&self);
}

/// A world of one process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl ProcessGroup for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn broadcast(&self, _: &mut [f32], _: usize) {}
    fn barrier(&self) {}
}

/// Gradient buckets of about this many bytes (PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Distributed data parallelism over a process group.
pub struct Ddp<'g> {
    /// The process group gradients are averaged over.
    pub group: &'g dyn ProcessGroup,
    /// Target bucket size in bytes (25 MB by default, as PyTorch).
    pub bucket_bytes: usize,
}

impl<'g> Ddp<'g> {
    /// Data parallelism over `group` with 25 MB buckets.
    pub fn new(group: &'g dyn ProcessGroup) -> Self {
        Ddp { group, bucket_bytes: BUCKET_BYTES }
    }

    /// Every rank starts from rank 0's parameters.
    pub fn broadcast_parameters(&self, model: &mut dyn Module) -> Result<()> {
        let mut res = Ok(());
        model.visit("", &mut |_, p| {
            if res.is_ok() {
                res = p.values_mut_f32().map(|v| self.group.broadcast(v, 0)).map_err(Into::into);
            }
        });
        res
    }

    /// Backpropagate `loss` and leave every parameter's gradient averaged over the ranks. Buckets
    /// (parameters in reverse order, as their gradients become final) are reduced on a
    /// communication thread while the backward pass continues.
    pub fn backward(&self, loss: &Tensor, model: &mut dyn Module) -> Result<()> {
        let mut params: Vec<Tensor> = vec![];
        model.visit("", &mut |_, p| {
            if p.is_requires_grad() {
                params.push(p.clone());
            }
        });
        params.reverse();
        // Buckets of consecutive parameters (reverse order: the last layers' gradients come first).
        let mut buckets: Vec<Vec<usize>> = vec![vec![]];
        let mut bytes = 0;
        for (i, p) in params.iter().enumerate() {
            if bytes > 0 && bytes + p.numel() * 4 > self.bucket_bytes {
                buckets.push(vec![]);
                bytes = 0;
            }
            buckets.last_mut().expect("one bucket").push(i);
            bytes += p.numel() * 4;
        }
        let mut where_: HashMap<usize, usize> = HashMap::new();
        for (b, idx) in buckets.iter().enumerate() {
            for &i in idx {
                if let Some(id) = params[i].grad_id() {
                    where_.insert(id, b);
                }
            }
        }
        let mut pending: Vec<usize> = buckets.iter().map(Vec::len).collect();
        let flatten = |b: usize| -> Vec<f32> {
            buckets[b].iter().flat_map(|&i| params[i].grad().map(|g| g.to_vec_f32().unwrap_or_default()).unwrap_or_else(|| vec![0.0; params[i].numel()])).collect()
        };
        let world = self.group.world() as f32;
        let group = self.group;
        let reduced: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| -> Result<Vec<(usize, Vec<f32>)>> {
            let (tx, rx) = mpsc::channel::<(usize, Vec<f32>)>();
            let comm = s.spawn(move || {
                let mut out = vec![];
                for (b, mut v) in rx {
                    group.all_reduce_sum(&mut v);
                    out.push((b, v));
                }
                out
            });
            let mut sent = vec![false; buckets.len()];
            let mut send_err = false;
            loss.backward_hooked(augur_core::Tensor::ones(loss.shape()), false, &mut |id| {
                let Some(&b) = where_.get(&id) else { return };
                pending[b] -= 1;
                if pending[b] == 0 {
                    sent[b] = true;
                    send_err |= tx.send((b, flatten(b))).is_err();
                }
            })?;
            // Buckets with a parameter the loss did not reach still take part (with zeros), so
            // every rank issues the same reductions in the same order.
            for (b, _) in sent.iter().enumerate().filter(|(_, &s)| !s) {
                send_err |= tx.send((b, flatten(b))).is_err();
            }
            drop(tx);
            let out = comm.join().map_err(|_| crate::Error::Invalid("the gradient communication thread panicked".into()))?;
            if send_err {
                return invalid("the gradient communication thread stopped early");
            }
            Ok(out)
        })?;
        for (b, v) in reduced {
            let mut off = 0;
            for &i in &buckets[b] {
                let n = params[i].numel();
                let g: Vec<f32> = v[off..off + n].iter().map(|x| x / world).collect();
                params[i].set_grad(Some(Tensor::from_vec(g, params[i].shape())?))?;
                off += n;
            }
        }
        Ok(())
    }
}

/// Ranks as threads of one process (for tests and single-machine runs without MPI): every
/// collective meets at a barrier and combines through shared memory.
pub struct ThreadGroup {
    rank: usize,
    shared: std::sync::Arc<Shared>,
}

struct Shared {
    world: usize,
    buf: std::sync::Mutex<Vec<f32>>,
    barrier: std::sync::Barrier,
}

impl ThreadGroup {
    /// One handle per rank, to be moved into that rank's thread.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = std::sync::Arc::new(Shared { world, buf: std::sync::Mutex::new(vec![]), barrier: std::sync::Barrier::new(world) });
        (0..world).map(|rank| ThreadGroup { rank, shared: shared.clone() }).collect()
    }

    fn buf(&self) -> std::sync::MutexGuard<'_, Vec<f32>> {
        self.shared.buf.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ProcessGroup for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let b = &self.shared.barrier;
        b.wait();
        if self.rank == 0 {
            *self.buf() = vec![0.0; buf.len()];
        }
        b.wait();
        self.buf().iter_mut().zip(buf.iter()).for_each(|(s, &x)| *s += x);
        b.wait();
        buf.copy_from_slice(&self.buf());
        b.wait();
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) {
        let b = &self.shared.barrier;
        b.wait();
        if self.rank == root {
            *self.buf() = buf.to_vec();
        }
        b.wait();
        buf.copy_from_slice(&self.buf());
        b.wait();
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
}
