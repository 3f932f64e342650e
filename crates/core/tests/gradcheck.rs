//! The finite-difference gradient checks of `augur_core::gradcheck` on the host, and checks
//! of FlashAttention against the plain definition.

use augur_core::gradcheck::{self, Rng};
use augur_core::{AttentionMask, Tensor};

#[test]
fn every_differentiable_op_passes_a_gradient_check() {
    gradcheck::check_every_op(None).unwrap();
}

#[test]
fn non_differentiable_ops_say_so() {
    let x = Tensor::from_f64(vec![1.0, 3.0, 2.0], &[1, 3]).unwrap().requires_grad(true);
    let err = x.max_last().unwrap().sum_all().unwrap().backward().unwrap_err();
    assert!(err.to_string().contains("not differentiable"), "{err}");
}

/// Multi-tile sizes (more queries and keys than one tile holds): FlashAttention's gradients equal
/// those of the plain definition (scores, softmax, weighted sum) differentiated by autograd.
#[test]
fn flash_attention_gradients_equal_the_naive_definition_across_tiles() {
    let mut r = Rng(7);
    for (tq, tk, causal, biased) in [(70, 70, true, true), (45, 130, true, true), (33, 97, false, true), (70, 70, true, false), (45, 130, true, false)] {
        let (b, h, hk, d) = (2, 4, 2, 8);
        let mk = |r: &mut Rng, s: &[usize]| Tensor::from_f64(r.vals(s.iter().product(), 0.0, 1.0, true), s).unwrap().requires_grad(true);
        let (q, k, v) = (mk(&mut r, &[b, h, tq, d]), mk(&mut r, &[b, hk, tk, d]), mk(&mut r, &[b, hk, tk, d]));
        let bias = mk(&mut r, &[h, tq, tk]);
        let w = Tensor::from_f64(r.vals(b * h * tq * d, 0.0, 1.0, true), &[b, h, tq, d]).unwrap();
        let mask = AttentionMask { causal, ..Default::default() };
        // Without a bias only the causal limit masks: the kernels' plain path.
        let b_in = if biased { Some(&bias) } else { None };
        Tensor::attention(&q, &k, &v, b_in, &mask).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let ins = if biased { vec![&q, &k, &v, &bias] } else { vec![&q, &k, &v] };
        let flash: Vec<Vec<f64>> = ins.iter().map(|t| t.grad().unwrap().to_vec_f64().unwrap()).collect();
        [&q, &k, &v, &bias].iter().for_each(|t| t.zero_grad());
        // Naive: repeat kv heads, full score matrix with -inf above the (end-aligned) diagonal.
        let rep = |t: &Tensor| -> Tensor {
            let parts: Vec<Tensor> = (0..h).map(|i| t.narrow(1, i / (h / hk), 1).unwrap()).collect();
            Tensor::cat(&parts.iter().collect::<Vec<_>>(), 1).unwrap()
        };
        let m: Vec<f64> = (0..tq * tk).map(|x| if causal && x % tk > x / tk + tk - tq { f64::NEG_INFINITY } else { 0.0 }).collect();
        let s = q.matmul(&rep(&k).transpose(2, 3).unwrap()).unwrap().scale(1.0 / (d as f64).sqrt()).unwrap();
        let s = if biased { s.add(&bias).unwrap() } else { s };
        let s = s.add(&Tensor::from_f64(m, &[tq, tk]).unwrap()).unwrap();
        s.softmax_last().unwrap().matmul(&rep(&v)).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, (t, f)) in ["q", "k", "v", "bias"].iter().zip(ins.iter().zip(&flash)) {
            let n = t.grad().unwrap().to_vec_f64().unwrap();
            for (a, b) in f.iter().zip(&n) {
                assert!((a - b).abs() < 1e-10 * (1.0 + b.abs()), "d{name} ({tq}x{tk}, causal {causal}): flash {a} vs naive {b}");
            }
        }
    }
}
