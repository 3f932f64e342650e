//! A decode step allocates nothing once warmed up: KV cache reserved, scratch sized, pool running.
//! Counts every heap allocation in the process (worker threads included) with a wrapping allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use augur_core::QuantType;
use augur_models::{tiny, Activations, Logits, Model, State};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

#[test]
fn decode_steps_allocate_nothing_after_warm_up() {
    let dir = std::env::temp_dir().join(format!("augur-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, quant) in [("f32", None), ("q4_1", Some(QuantType::Q4_1)), ("q6_k", Some(QuantType::Q6_K))] {
        let path = dir.join(format!("{name}.gguf"));
        tiny::write_gguf(&path, true, quant, 11).unwrap();
        let model = Model::open(&path).unwrap();
        for act in [Activations::I16, Activations::I22, Activations::F32] {
            let mut st = State::new(&model.llama.cfg);
            st.activations = act;
            st.reserve(&model.llama.cfg, 64);
            let mut next = argmax(model.llama.forward(&mut st, &[5, 6, 7, 8], Logits::Last).unwrap());
            for _ in 0..3 {
                next = argmax(model.llama.forward(&mut st, &[next], Logits::Last).unwrap());
            }
            let before = ALLOCS.load(Ordering::SeqCst);
            for _ in 0..20 {
                next = argmax(model.llama.forward(&mut st, &[next], Logits::Last).unwrap());
            }
            let n = ALLOCS.load(Ordering::SeqCst) - before;
            assert_eq!(n, 0, "{name} {act:?}: {n} allocations in 20 decode steps");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
