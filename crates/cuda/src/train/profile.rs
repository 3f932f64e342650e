//! Per-op device time when `AUGUR_CUDA_PROFILE=1`: each op of the training backend waits for
//! the device before and after (serialising the stream, so the sum is slower than a real step),
//! and [`profile_report`] lists where a step's time goes.

use std::sync::{Mutex, OnceLock};

use super::Cuda;

/// One op's timing, recorded when dropped.
pub(super) struct Prof<'a> {
    be: &'a Cuda,
    op: &'static str,
    start: std::time::Instant,
}

static PROFILE: Mutex<Option<std::collections::BTreeMap<&'static str, (u64, f64)>>> = Mutex::new(None);

fn profiling() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("AUGUR_CUDA_PROFILE").is_ok_and(|v| v == "1"))
}

impl Drop for Prof<'_> {
    fn drop(&mut self) {
        let _ = self.be.dev.stream.synchronize();
        let dt = self.start.elapsed().as_secs_f64();
        let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.get_or_insert_with(Default::default).entry(self.op).or_default();
        e.0 += 1;
        e.1 += dt;
    }
}

/// The per-op totals gathered under `AUGUR_CUDA_PROFILE=1` (op, calls, seconds), largest first,
/// and the totals are reset.
pub fn profile_report() -> Vec<(&'static str, u64, f64)> {
    let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = p.take().unwrap_or_default().into_iter().map(|(k, (n, t))| (k, n, t)).collect();
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
            let _ = self.dev.stream.synchronize();
            Prof { be: self, op: s, start: std::time::Instant::now() }
        })
    }

    pub(super) fn prof(&self, op: &'static str) -> Option<Prof<'_>> {
        profiling().then(|| {
            let _ = self.dev.stream.synchronize();
            Prof { be: self, op, start: std::time::Instant::now() }
        })
    }

}
