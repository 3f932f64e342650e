//! GFLOPS of the f32 matmul op on a training-sized product (compare with your BLAS).
use augur_core::Tensor;
use std::time::Instant;

fn main() {
    let (m, k, n) = (2048, 384, 1536);
    let a = Tensor::from_vec((0..m * k).map(|i| (i % 7) as f32 * 0.1).collect(), &[m, k]).unwrap();
    let b = Tensor::from_vec((0..k * n).map(|i| (i % 5) as f32 * 0.1).collect(), &[k, n]).unwrap();
    let bt = Tensor::from_vec((0..k * n).map(|i| (i % 5) as f32 * 0.1).collect(), &[n, k]).unwrap();
    for (name, rhs) in [("a·b", b.clone()), ("a·wᵀ (linear)", bt.transpose(0, 1).unwrap())] {
        for _ in 0..3 {
            a.matmul(&rhs).unwrap();
        }
        let t = Instant::now();
        for _ in 0..20 {
            a.matmul(&rhs).unwrap();
        }
        let dt = t.elapsed().as_secs_f64() / 20.0;
        println!("{name}: {:.1} GFLOPS", 2.0 * (m * k * n) as f64 / dt / 1e9);
    }
}
