//! Data parallelism: a [`ProcessGroup`] (rank, world size, all-reduce, broadcast, barrier) and
//! [`Ddp`], which averages gradients across ranks in buckets while the backward pass is still
//! running. Backends: [`Solo`] (one process) and [`ThreadGroup`] here, MPI and NCCL in the
//! `augur-dist` crate. A group that reaches device memory ([`DeviceCollectives`], NCCL) reduces
//! device gradients where they are, on a stream beside the backward pass; the others stage them
//! through the host.

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
    /// Collectives on device tensors, when this group has them.
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        None
    }
}

/// Collectives on device memory, ordered with the device's queued work (NCCL's model).
pub trait DeviceCollectives {
    /// Replace the contiguous f32 device tensor `t` with its mean over the ranks. The collective
    /// is queued after the work already queued on `t`'s device and may run beside work queued
    /// later; `t` must stay alive, and unread, until [`DeviceCollectives::fence`].
    fn all_reduce_mean(&self, t: &Tensor) -> Result<()>;
    /// Make the work queued on `t`'s device from now on wait for every collective queued so far.
    fn fence(&self, t: &Tensor) -> Result<()>;
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
    /// (parameters in reverse order, as their gradients become final) are reduced while the
    /// backward pass continues: on the device's collective stream when the gradients are on a
    /// device and the group reaches device memory, else on a communication thread through host
    /// memory.
    pub fn backward(&self, loss: &Tensor, model: &mut dyn Module) -> Result<()> {
        let mut params: Vec<Tensor> = vec![];
        model.visit("", &mut |_, p| {
            if p.is_requires_grad() {
                params.push(p.clone());
            }
        });
        params.reverse();
        let (members, arrivals) = buckets(&params, self.bucket_bytes);
        match self.group.device_collectives() {
            Some(dc) if params.first().is_some_and(|p| p.device().is_some()) => self.backward_on_device(loss, &params, &members, arrivals, dc),
            _ => self.backward_through_host(loss, &params, &members, arrivals),
        }
    }

    /// Buckets flattened on the device and averaged there by the group's collectives.
    fn backward_on_device(&self, loss: &Tensor, params: &[Tensor], members: &[Vec<usize>], mut arrivals: Arrivals, dc: &dyn DeviceCollectives) -> Result<()> {
        let flatten = |b: &[usize]| -> Result<Tensor> {
            let parts = b.iter().map(|&i| -> Result<Tensor> {
                let p = &params[i];
                let g = match p.grad() {
                    Some(g) => g,
                    None => p.full_like_device(p.shape(), 0.0)?,
                };
                Ok(g.to_dtype(augur_core::DType::F32)?.reshape(&[p.numel()])?)
            });
            let parts = parts.collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)?)
        };
        let mut flat: Vec<Option<Tensor>> = vec![None; members.len()];
        let mut failed: Option<crate::Error> = None;
        let mut reduce = |b: usize, flat: &mut Vec<Option<Tensor>>| {
            if failed.is_some() {
                return;
            }
            match flatten(&members[b]).and_then(|t| dc.all_reduce_mean(&t).map(|()| t)) {
                Ok(t) => flat[b] = Some(t),
                Err(e) => failed = Some(e),
            }
        };
        loss.backward_hooked(Tensor::ones(loss.shape()), false, &mut |id| {
            if let Some(b) = arrivals.arrived(id) {
                reduce(b, &mut flat);
            }
        })?;
        for b in arrivals.unsent() {
            reduce(b, &mut flat);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // One fence orders the training stream after every bucket's collective.
        if let Some(Some(t)) = flat.first() {
            dc.fence(t)?;
        }
        for (b, t) in flat.iter().enumerate() {
            let Some(t) = t else { return invalid("a gradient bucket was never reduced") };
            // Each gradient is a view of its reduced bucket: no copies.
            let mut off = 0;
            for &i in &members[b] {
                let n = params[i].numel();
                params[i].set_grad(Some(t.narrow(0, off, n)?.reshape(params[i].shape())?))?;
                off += n;
            }
        }
        Ok(())
    }

    /// Buckets copied to host memory and reduced on a communication thread.
    fn backward_through_host(&self, loss: &Tensor, params: &[Tensor], members: &[Vec<usize>], mut arrivals: Arrivals) -> Result<()> {
        let flatten = |b: &[usize]| -> Vec<f32> {
            b.iter().flat_map(|&i| params[i].grad().map(|g| g.to_vec_f32().unwrap_or_default()).unwrap_or_else(|| vec![0.0; params[i].numel()])).collect()
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
            let mut send_err = false;
            loss.backward_hooked(Tensor::ones(loss.shape()), false, &mut |id| {
                if let Some(b) = arrivals.arrived(id) {
                    send_err |= tx.send((b, flatten(&members[b]))).is_err();
                }
            })?;
            for b in arrivals.unsent() {
                send_err |= tx.send((b, flatten(&members[b]))).is_err();
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
            for &i in &members[b] {
                let n = params[i].numel();
                let g: Vec<f32> = v[off..off + n].iter().map(|x| x / world).collect();
                params[i].set_grad(Some(Tensor::from_vec(g, params[i].shape())?))?;
                off += n;
            }
        }
        Ok(())
    }
}

/// Parameters grouped into buckets of consecutive parameters of about `bucket_bytes` (in the
/// reverse order given: the last layers' gradients come first), and the tracker of which buckets
/// are complete as gradients arrive.
fn buckets(params: &[Tensor], bucket_bytes: usize) -> (Vec<Vec<usize>>, Arrivals) {
    let mut members: Vec<Vec<usize>> = vec![vec![]];
    let mut bytes = 0;
    for (i, p) in params.iter().enumerate() {
        if bytes > 0 && bytes + p.numel() * 4 > bucket_bytes {
            members.push(vec![]);
            bytes = 0;
        }
        members.last_mut().expect("one bucket").push(i);
        bytes += p.numel() * 4;
    }
    let mut of = HashMap::new();
    for (b, idx) in members.iter().enumerate() {
        for &i in idx {
            if let Some(id) = params[i].grad_id() {
                of.insert(id, b);
            }
        }
    }
    let arrivals = Arrivals { of, pending: members.iter().map(Vec::len).collect(), sent: vec![false; members.len()] };
    (members, arrivals)
}

/// Which buckets are complete as the backward pass makes gradients final.
struct Arrivals {
    /// Gradient id → bucket.
    of: HashMap<usize, usize>,
    /// Gradients each bucket still waits for.
    pending: Vec<usize>,
    /// Buckets already handed to the collectives.
    sent: Vec<bool>,
}

impl Arrivals {
    /// Gradient `id` is final: the bucket it completes, if it does.
    fn arrived(&mut self, id: usize) -> Option<usize> {
        let &b = self.of.get(&id)?;
        self.pending[b] -= 1;
        (self.pending[b] == 0).then(|| {
            self.sent[b] = true;
            b
        })
    }

    /// Buckets with a parameter the loss did not reach: they still take part (with zeros), so
    /// every rank issues the same reductions in the same order.
    fn unsent(&self) -> Vec<usize> {
        self.sent.iter().enumerate().filter(|(_, &s)| !s).map(|(b, _)| b).collect()
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
