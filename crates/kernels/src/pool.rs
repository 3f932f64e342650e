//! A persistent worker pool with spin-then-park workers, for the many small parallel regions of a
//! decode step (a 30-layer model runs ~250 per token).
//!
//! Why not rayon: waking rayon's sleeping workers costs microseconds per region, which at a few
//! hundred regions per token is a large share of a ~10 ms step. Here workers spin on an epoch
//! counter for a short while after each job (a dispatch then costs well under a microsecond) and
//! park only when the pool has been idle, so an idle process does not burn CPU.
//!
//! Rules: one job at a time (a mutex serialises callers); a job that itself calls the pool runs its
//! inner work inline on the calling thread; a panic in a job is re-raised on the caller.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};

/// Spins (with `spin_loop` hints) before a worker parks: about a hundred microseconds.
const SPINS_BEFORE_PARK: usize = 200_000;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Incremented for every job; workers watch it.
    epoch: AtomicUsize,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// The current job, lifetime-erased; valid while `pending > 0` for this epoch.
    job: Mutex<Option<&'static Job>>,
    panicked: AtomicBool,
    sleeping: Vec<AtomicBool>,
    shutdown: AtomicBool,
}

/// A fixed set of worker threads (plus the calling thread).
pub struct Pool {
    n: usize,
    shared: Arc<Shared>,
    workers: Vec<Thread>,
    dispatch: Mutex<()>,
}

thread_local! {
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

/// Set the global pool's thread count; must come before its first use. Returns false if the pool
/// already exists with another size.
pub fn set_threads(n: usize) -> bool {
    REQUESTED.store(n.max(1), Ordering::SeqCst);
    GLOBAL.get().is_none_or(|p| p.n == n.max(1))
}

/// The process-wide pool: [`set_threads`], else `AUGUR_THREADS`, else all cores.
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| {
        let env = std::env::var("AUGUR_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
        let n = match REQUESTED.load(Ordering::SeqCst) {
            0 => env.unwrap_or_else(|| thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            n => n,
        };
        Pool::new(n)
    })
}

fn worker(shared: Arc<Shared>, idx: usize, n: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        let epoch = loop {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if spins < SPINS_BEFORE_PARK {
                std::hint::spin_loop();
            } else {
                shared.sleeping[idx].store(true, Ordering::SeqCst);
                if shared.epoch.load(Ordering::SeqCst) == seen && !shared.shutdown.load(Ordering::SeqCst) {
                    thread::park();
                }
                shared.sleeping[idx].store(false, Ordering::SeqCst);
                spins = 0;
            }
        };
        seen = epoch;
        let job = *shared.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = job {
            IN_JOB.with(|f| f.set(true));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(idx, n)));
            IN_JOB.with(|f| f.set(false));
            if r.is_err() {
                shared.panicked.store(true, Ordering::SeqCst);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// A pool of `n` threads in all: `n - 1` workers plus the caller.
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            panicked: AtomicBool::new(false),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..n)
            .map(|i| {
                let s = shared.clone();
                thread::Builder::new()
                    .name(format!("augur-worker-{i}"))
                    .spawn(move || worker(s, i, n))
                    .expect("spawn worker thread")
                    .thread()
                    .clone()
            })
            .collect();
        Pool { n, shared, workers, dispatch: Mutex::new(()) }
    }

    /// Number of threads that run parallel work (the caller included).
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Run `f(thread_index, n_threads)` on every thread of the pool and wait for all of them.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.n == 1 || IN_JOB.with(|j| j.get()) {
            // Inline: single-threaded pool, or a nested call from inside a job.
            for i in 0..self.n {
                f(i, self.n);
            }
            return;
        }
        let _serial = self.dispatch.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the job reference is only used by workers until they decrement `pending`, and
        // this function does not return before `pending` reaches zero, so `f` outlives every use.
        let erased: &'static Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(f) };
        *self.shared.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(erased);
        self.shared.pending.store(self.n - 1, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (i, t) in self.workers.iter().enumerate() {
            if self.shared.sleeping[i + 1].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        IN_JOB.with(|j| j.set(true));
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, self.n)));
        IN_JOB.with(|j| j.set(false));
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a worker thread panicked inside a parallel job");
        }
    }

    /// Split `0..n_items` into chunks of `chunk` and hand them out dynamically to the threads:
    /// `f(start..end)` runs once per chunk.
    pub fn for_chunks(&self, n_items: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        let n_chunks = n_items.div_ceil(chunk);
        if n_chunks <= 1 || self.n == 1 {
            if n_items > 0 {
                f(0..n_items);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|_, _| loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= n_chunks {
                break;
            }
            f(c * chunk..((c + 1) * chunk).min(n_items));
        });
    }
}

/// A raw pointer that parallel jobs may share, for writing disjoint parts of one output buffer.
/// Each use site states why its writes are disjoint.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Wrap `p` for sharing with the pool's workers.
    pub fn new(p: *mut T) -> Self {
        SyncPtr(p)
    }

    /// # Safety
    /// `start..start+len` must be inside the buffer and written by no other thread meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// The raw pointer.
    pub fn ptr(&self) -> *mut T {
        self.0
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in &self.workers {
            t.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once() {
        let p = Pool::new(3);
        for n in [0usize, 1, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            p.for_chunks(n, 13, &|r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn nested_calls_run_inline_and_many_jobs_complete() {
        let p = Pool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            p.run(&|_, _| {
                p.run(&|_, _| {
                    total.fetch_add(1, Ordering::Relaxed);
                });
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 2 * 2);
    }

    #[test]
    fn workers_wake_after_parking() {
        let p = Pool::new(2);
        let total = AtomicUsize::new(0);
        p.run(&|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        p.run(&|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_panicking_job_panics_the_caller() {
        let p = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.run(&|i, _| assert!(i == 0, "worker fails"))));
        assert!(r.is_err());
        let total = AtomicUsize::new(0);
        p.run(&|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 2, "the pool still works afterwards");
    }
}
