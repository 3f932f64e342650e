//! The autograd engine's contract: accumulation, zero_grad, detach, no_grad, graph freeing.

use augur_core::{amp, no_grad, DType, Tensor};

fn leaf(v: Vec<f32>, s: &[usize]) -> Tensor {
    Tensor::from_vec(v, s).unwrap().requires_grad(true)
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

#[test]
fn second_backward_accumulates_until_zero_grad() {
    let x = leaf(vec![1.0, 2.0, 3.0], &[3]);
    let loss = || x.mul(&x).unwrap().sum_all().unwrap();
    loss().backward().unwrap();
    assert_eq!(vals(&x.grad().unwrap()), [2.0, 4.0, 6.0]);
    loss().backward().unwrap();
    assert_eq!(vals(&x.grad().unwrap()), [4.0, 8.0, 12.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
    loss().backward().unwrap();
    assert_eq!(vals(&x.grad().unwrap()), [2.0, 4.0, 6.0]);
}

#[test]
fn shared_subexpressions_sum_their_paths() {
    // y = x·x; z = y + y·x  →  dz/dx = 2x + 3x²
    let x = leaf(vec![2.0], &[1]);
    let y = x.mul(&x).unwrap();
    y.add(&y.mul(&x).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(&x.grad().unwrap()), [4.0 + 12.0]);
}

#[test]
fn detach_and_no_grad_cut_the_graph() {
    let x = leaf(vec![3.0], &[1]);
    let d = x.detach();
    assert!(!d.is_requires_grad());
    let y = x.mul(&d).unwrap(); // d is a constant
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(&x.grad().unwrap()), [3.0]);
    let z = no_grad(|| x.mul(&x).unwrap());
    assert!(!z.is_requires_grad());
    assert!(z.sum_all().unwrap().backward().is_err());
    // Recording is back on after the scope.
    assert!(x.mul(&x).unwrap().is_requires_grad());
}

#[test]
fn the_graph_is_freed_unless_retained() {
    let x = leaf(vec![1.0, -1.0], &[2]);
    let loss = x.exp().unwrap().sum_all().unwrap();
    loss.backward_with(Tensor::scalar(1.0), true).unwrap();
    loss.backward().unwrap(); // retained once, so this works and frees it
    let e = std::f32::consts::E;
    let g = vals(&x.grad().unwrap());
    assert!((g[0] - 2.0 * e).abs() < 1e-5 && (g[1] - 2.0 / e).abs() < 1e-5, "{g:?}");
    let err = loss.backward().unwrap_err().to_string();
    assert!(err.contains("freed") && err.contains("retain_graph"), "{err}");
}

#[test]
fn only_leaves_keep_gradients_and_backward_needs_a_scalar() {
    let x = leaf(vec![1.0, 2.0], &[2]);
    let y = x.scale(3.0).unwrap();
    assert!(!y.is_leaf() && y.grad_fn() == Some("affine"));
    y.sum_all().unwrap().backward().unwrap();
    assert!(y.grad().is_none(), "non-leaf gradients are freed after use");
    assert!(y.backward().unwrap_err().to_string().contains("one-element"));
}

#[test]
fn autocast_runs_matmul_in_bf16_with_f32_master_gradients() {
    let w = leaf(vec![0.1, 0.2, 0.3, 0.4], &[2, 2]);
    let x = Tensor::from_vec(vec![1.0, 1.0 + 1.0 / 512.0], &[1, 2]).unwrap();
    let y = amp::autocast(Some(DType::BF16), || x.matmul(&w).unwrap()).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // Outside the scope a norm reads bf16 and computes in f32.
    assert_eq!(y.softmax_last().unwrap().dtype(), DType::F32);
    y.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    let g = w.grad().unwrap();
    assert_eq!(g.dtype(), DType::F32);
    // x rounds to bf16 (1 + 1/512 is not representable: it becomes 1).
    assert_eq!(vals(&g), [1.0, 1.0, 1.0, 1.0]);
    assert!(amp::autocast(Some(DType::F32), || ()).is_err());
}

#[test]
fn optimizer_style_update_keeps_identity() {
    let mut w = leaf(vec![1.0, 2.0], &[2]);
    w.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    let alias = w.clone();
    let g = vals(&w.grad().unwrap());
    for (p, g) in w.values_mut_f32().unwrap().iter_mut().zip(g) {
        *p -= 0.5 * g;
    }
    assert_eq!(vals(&w), [0.0, 0.0]);
    // The grad is shared by every clone of the parameter.
    assert!(alias.grad().is_some());
    w.zero_grad();
    assert!(alias.grad().is_none());
}

#[test]
fn log_softmax_stays_finite_far_below_the_maximum() {
    // exp(-200) underflows f32; log-softmax must still be the exact shift, not ln(0).
    let x = Tensor::from_vec(vec![0.0, -200.0, 3.0, 1.0], &[2, 2]).unwrap();
    let y = x.log_softmax_last().unwrap().to_vec_f32().unwrap();
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    assert!((y[0] - 0.0).abs() < 1e-6 && (y[1] + 200.0).abs() < 1e-4, "{y:?}");
    let want = [3.0 - (3f32.exp() + 1f32.exp()).ln(), 1.0 - (3f32.exp() + 1f32.exp()).ln()];
    assert!((y[2] - want[0]).abs() < 1e-5 && (y[3] - want[1]).abs() < 1e-5, "{y:?}");
}
