//! FlashAttention's memory grows linearly with sequence length: the peak heap of a forward and
//! backward pass at 4× the length is about 4× (never the 16× of a score matrix).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use augur_core::{AttentionMask, Tensor};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded to the system allocator with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak heap growth of a causal attention forward + backward over `t` positions.
fn peak(t: usize, flash: bool) -> usize {
    let (h, d) = (2, 32);
    let mk = |seed: usize| Tensor::from_vec((0..h * t * d).map(|i| ((i * 7 + seed) % 13) as f32 / 13.0 - 0.5).collect(), &[1, h, t, d]).unwrap().requires_grad(true);
    let (q, k, v) = (mk(1), mk(2), mk(3));
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = if flash {
        Tensor::attention(&q, &k, &v, None, &AttentionMask { causal: true, ..Default::default() }).unwrap()
    } else {
        // The plain definition: a [t, t] score matrix per head.
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let s = q.matmul(&k.transpose(2, 3).unwrap()).unwrap().scale(1.0 / (d as f64).sqrt()).unwrap();
        s.add(&Tensor::from_vec(mask, &[t, t]).unwrap()).unwrap().softmax_last().unwrap().matmul(&v).unwrap()
    };
    out.sum_all().unwrap().backward().unwrap();
    PEAK.load(Ordering::Relaxed) - base
}

#[test]
fn flash_attention_memory_is_linear_in_length() {
    // Serial in one test: the allocator counters are process-wide.
    let (f1, f4) = (peak(512, true), peak(2048, true));
    let (n1, n4) = (peak(512, false), peak(2048, false));
    let (fr, nr) = (f4 as f64 / f1 as f64, n4 as f64 / n1 as f64);
    assert!(fr < 5.0, "flash peak grew {fr:.1}x for 4x the length ({f1} -> {f4} bytes)");
    assert!(nr > 10.0, "the naive version should grow quadratically, grew {nr:.1}x");
    assert!(f4 * 8 < n4, "flash {f4} bytes vs naive {n4} at 2048 positions");
}
