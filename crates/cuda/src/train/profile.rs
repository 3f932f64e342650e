//! Per-op device time when `AUGUR_CUDA_PROFILE=1`: each op of the training backend records a
//! timing event on its stream before and after its kernels (nothing waits, so the step runs as
//! it does unprofiled), and [`profile_report`] reads the events and lists where a step's device
//! time goes. An op that calls another op counts the inner one too.

use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use super::Cuda;

/// One op's timing, recorded when dropped.
pub(super) struct Prof<'a> {
    be: &'a Cuda,
    op: &'static str,
    start: Option<CudaEvent>,
}

/// Ops with their start and end events, not yet read.
static PENDING: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>> = Mutex::new(Vec::new());

fn timing_event(be: &Cuda) -> Option<CudaEvent> {
    be.dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok()
}

fn profiling() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("AUGUR_CUDA_PROFILE").is_ok_and(|v| v == "1"))
}

impl Drop for Prof<'_> {
    fn drop(&mut self) {
        if let (Some(start), Some(end)) = (self.start.take(), timing_event(self.be)) {
            PENDING.lock().unwrap_or_else(|e| e.into_inner()).push((self.op, start, end));
        }
    }
}

/// The per-op device time gathered under `AUGUR_CUDA_PROFILE=1` since the last call (op, calls,
/// seconds), largest first. Waits for the events.
pub fn profile_report() -> Vec<(&'static str, u64, f64)> {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    let mut totals: std::collections::BTreeMap<&'static str, (u64, f64)> = Default::default();
    for (op, start, end) in pending {
        let e = totals.entry(op).or_default();
        e.0 += 1;
        e.1 += start.elapsed_ms(&end).map_or(0.0, |ms| ms as f64 / 1e3);
    }
    let mut v: Vec<_> = totals.into_iter().map(|(k, (n, t))| (k, n, t)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

impl Cuda {
    /// A profile entry named at run time (leaked: profiling runs only).
    pub(super) fn prof_named(&self, op: impl FnOnce() -> String) -> Option<Prof<'_>> {
        profiling().then(|| {
            static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
            let name = op();
            let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
            let s = match names.iter().find(|n| **n == name) {
                Some(n) => *n,
                None => {
                    let n: &'static str = Box::leak(name.into_boxed_str());
                    names.push(n);
                    n
                }
            };
            Prof { be: self, op: s, start: timing_event(self) }
        })
    }

    pub(super) fn prof(&self, op: &'static str) -> Option<Prof<'_>> {
        profiling().then(|| Prof { be: self, op, start: timing_event(self) })
    }
}
