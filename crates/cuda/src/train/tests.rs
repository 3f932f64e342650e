//! The training backend against the host: the registry's finite-difference gradient checks (f64)
//! on the device, and each op's output and gradients in f32 at sizes that take every kernel
//! path (several blocks, atomics, transposed operands, 16-bit products and FlashAttention).
//! Without a device they skip, saying so; the compile check needs only NVRTC.

use std::sync::{MutexGuard, OnceLock};

use augur_core::amp::autocast;
use augur_core::{gradcheck, AttentionMask, DType, Device, Tensor, UnaryOp};

use super::{Cuda, TRAIN};
use crate::device::compile_uncached;
use crate::tests::Rng;

fn backend() -> Option<(Device, MutexGuard<'static, ()>)> {
    static BE: OnceLock<Option<Device>> = OnceLock::new();
    let (dev, turn) = crate::tests::device()?;
    let be = BE.get_or_init(|| match Cuda::new(&dev) {
        Ok(c) => Some(Device(c)),
        Err(e) => {
            eprintln!("skipped: the training backend did not start ({e})");
            None
        }
    });
    Some((be.clone()?, turn))
}

#[test]
fn train_kernels_compile() {
    match compile_uncached(&TRAIN, "sm_90") {
        Ok(_) => {}
        Err(crate::Error::NoNvrtc) => eprintln!("skipped: NVRTC is not installed"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn every_op_passes_the_gradient_checks_on_the_device() {
    let Some((dev, _turn)) = backend() else { return };
    gradcheck::check_every_op(Some(&dev)).unwrap();
}

type Op = Box<dyn Fn(&[Tensor]) -> augur_core::Result<Tensor>>;

/// `f` of leaves with these shapes, on the host and on the device: outputs and every leaf's
/// gradient of `Σ out · w` agree to `tol` (relative L2).
fn agree(dev: &Device, name: &str, shapes: &[&[usize]], f: Op, tol: f64) {
    let mut r = Rng(name.len() as u64 * 7919 + 1);
    let vals: Vec<Vec<f32>> = shapes.iter().map(|s| r.vec(s.iter().product())).collect();
    let run = |on: Option<&Device>| -> (Vec<f32>, Vec<Vec<f32>>) {
        let leaves: Vec<Tensor> = vals.iter().zip(shapes).map(|(v, s)| Tensor::from_vec(v.clone(), s).unwrap().to(on).unwrap().detach().requires_grad(true)).collect();
        let out = f(&leaves).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut wr = Rng(99);
        let w = Tensor::from_vec(wr.vec(out.numel()), out.shape()).unwrap();
        out.to_dtype(DType::F32).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = leaves.iter().map(|l| l.grad().map_or_else(|| vec![0.0; l.numel()], |g| g.to_vec_f32().unwrap())).collect();
        (out.to_vec_f32().unwrap(), grads)
    };
    let (host, dhost) = run(None);
    let (gpu, dgpu) = run(Some(dev));
    let e = crate::tests::rel(&gpu, &host);
    assert!(e < tol, "{name}: output off by {e:.2e}");
    for (i, (a, b)) in dgpu.iter().zip(&dhost).enumerate() {
        let e = crate::tests::rel(a, b);
        assert!(e < tol, "{name}: gradient of input {i} off by {e:.2e}");
    }
}

#[test]
fn ops_match_the_host_at_scale() {
    let Some((dev, _turn)) = backend() else { return };
    let d = &dev;
    for op in [UnaryOp::Exp, UnaryOp::Silu, UnaryOp::Gelu, UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Relu, UnaryOp::Sqr, UnaryOp::Abs] {
        agree(d, &format!("{op:?}"), &[&[300, 1000]], Box::new(move |t| t[0].unary(op)), 1e-5);
    }
    agree(d, "bias add", &[&[64, 513], &[513]], Box::new(|t| t[0].add(&t[1])), 1e-6);
    // Eight elements a thread: flat operands on multiples of eight, in f32, bf16 and mixed, and
    // views whose offset is (1000) or is not (1001) a multiple of eight.
    let bf = DType::BF16;
    agree(d, "bias add by eights", &[&[64, 512], &[512]], Box::new(|t| t[0].add(&t[1])), 1e-6);
    agree(d, "bf16 gelu", &[&[300, 1000]], Box::new(move |t| t[0].to_dtype(bf)?.unary(UnaryOp::Gelu)), 1e-2);
    agree(d, "bf16 add", &[&[300, 1000], &[300, 1000]], Box::new(move |t| t[0].to_dtype(bf)?.add(&t[1].to_dtype(bf)?)), 1e-2);
    agree(d, "bf16 times f32", &[&[300, 1000], &[300, 1000]], Box::new(move |t| t[0].to_dtype(bf)?.mul(&t[1])), 1e-2);
    agree(d, "bf16 affine", &[&[300, 1000]], Box::new(move |t| t[0].to_dtype(bf)?.affine(0.5, 1.0)), 1e-2);
    for cols in [1000, 1001] {
        agree(d, &format!("offset views, rows of {cols}"), &[&[300, cols]], Box::new(|t| t[0].narrow(0, 1, 299)?.unary(UnaryOp::Exp)?.sub(&t[0].narrow(0, 0, 299)?)), 1e-5);
        agree(d, &format!("offset conversion, rows of {cols}"), &[&[300, cols]], Box::new(move |t| t[0].narrow(0, 1, 299)?.to_dtype(bf)?.to_dtype(DType::F32)), 1e-2);
    }
    agree(d, "broadcast mul", &[&[64, 1, 7], &[1, 5, 7]], Box::new(|t| t[0].mul(&t[1])), 1e-6);
    agree(d, "transposed div", &[&[40, 30], &[30, 40]], Box::new(|t| t[0].div(&t[1].transpose(0, 1)?.affine(0.1, 3.0)?)), 1e-5);
    agree(d, "maximum", &[&[50, 60], &[60]], Box::new(|t| t[0].maximum(&t[1])), 1e-6);
    agree(d, "sum to a bias", &[&[4096, 96]], Box::new(|t| t[0].sum_to(&[96])), 1e-5);
    agree(d, "sum all", &[&[2000, 37]], Box::new(|t| t[0].sum_all()), 1e-5);
    agree(d, "sum middle", &[&[8, 300, 5]], Box::new(|t| t[0].sum_to(&[8, 1, 5])), 1e-5);
    agree(d, "sum last", &[&[300, 700]], Box::new(|t| t[0].sum_last()), 1e-5);
    agree(d, "matmul batched", &[&[3, 70, 50], &[3, 50, 40]], Box::new(|t| t[0].matmul(&t[1])), 1e-5);
    agree(d, "linear", &[&[2, 100, 64], &[96, 64]], Box::new(|t| t[0].linear(&t[1])), 1e-5);
    agree(d, "matmul of transposes", &[&[50, 70], &[40, 50]], Box::new(|t| t[0].transpose(0, 1)?.matmul(&t[1].transpose(0, 1)?)), 1e-5);
    agree(d, "softmax", &[&[50, 3000]], Box::new(|t| t[0].softmax_last()), 1e-5);
    agree(d, "log softmax", &[&[50, 3000]], Box::new(|t| t[0].log_softmax_last()), 1e-5);
    agree(d, "layer norm", &[&[700, 384], &[384], &[384]], Box::new(|t| t[0].layer_norm(&t[1], &t[2], 1e-5)), 1e-5);
    agree(d, "rms norm", &[&[700, 576], &[576]], Box::new(|t| t[0].rms_norm(&t[1], 1e-5)), 1e-5);
    let ids: Vec<u32> = (0..900u32).map(|i| (i * 7919) % 300).collect();
    agree(d, "embedding", &[&[300, 64]], Box::new(move |t| t[0].gather_rows(&ids)), 1e-6);
    let targets: Vec<u32> = (0..200u32).map(|i| if i % 9 == 0 { 7 } else { (i * 31) % 5000 }).collect();
    let t16 = targets.clone();
    agree(d, "cross entropy", &[&[200, 5000]], Box::new(move |t| t[0].cross_entropy(&targets, Some(7))), 1e-5);
    // 16-bit logits are read as they are and get a 16-bit gradient.
    agree(d, "bf16 cross entropy", &[&[200, 5000]], Box::new(move |t| t[0].to_dtype(bf)?.cross_entropy(&t16, Some(7))), 1e-2);
    let (c, s) = rope_tables(64, 16);
    let (c2, s2) = (c.clone(), s.clone());
    agree(d, "rope", &[&[2, 4, 64, 32]], Box::new(move |t| t[0].rope(&c, &s, false)), 1e-6);
    // Eight pairs a thread from a transposed 16-bit view (as attention's q and k), and the
    // one-pair path where half a row is not a multiple of eight.
    agree(d, "rope of a transposed bf16 view", &[&[2, 64, 4, 32]], Box::new(move |t| t[0].to_dtype(bf)?.transpose(1, 2)?.rope(&c2, &s2, false)), 1e-2);
    let (c3, s3) = rope_tables(64, 12);
    agree(d, "rope, rows of 24", &[&[2, 4, 64, 24]], Box::new(move |t| t[0].rope(&c3, &s3, false)), 1e-6);
    agree(d, "bf16 transpose", &[&[2, 64, 4, 32]], Box::new(move |t| t[0].to_dtype(bf)?.transpose(1, 2)?.contiguous()), 1e-2);
    agree(d, "cat and narrow", &[&[6, 40], &[6, 24]], Box::new(|t| Tensor::cat(&[&t[0], &t[1]], 1)?.narrow(1, 10, 50)), 1e-6);
    agree(d, "pad", &[&[6, 40]], Box::new(|t| t[0].pad(0, 3, 12)), 1e-6);
    let mask = AttentionMask { causal: true, ..Default::default() };
    agree(d, "attention f32 (general kernels)", &[&[2, 4, 70, 24], &[2, 2, 90, 24], &[2, 2, 90, 24]], Box::new(move |t| Tensor::attention(&t[0], &t[1], &t[2], None, &mask)), 1e-5);
}

fn rope_tables(seq: usize, half: usize) -> (Tensor, Tensor) {
    let ang: Vec<f32> = (0..seq * half).map(|i| (i / half) as f32 * 0.1 / (1.0 + (i % half) as f32)).collect();
    (Tensor::from_vec(ang.iter().map(|a| a.cos()).collect(), &[seq, half]).unwrap(), Tensor::from_vec(ang.iter().map(|a| a.sin()).collect(), &[seq, half]).unwrap())
}

#[test]
fn bf16_products_and_flash_attention_track_the_host() {
    let Some((dev, _turn)) = backend() else { return };
    // Inside autocast both sides round their inputs to bf16 and accumulate in f32; the host
    // accumulates in a different order and the device keeps bf16 outputs.
    let bf16 = |f: Op| -> Op { Box::new(move |t| autocast(Some(DType::BF16), || f(t))?) };
    agree(&dev, "bf16 matmul", &[&[256, 384], &[512, 384]], bf16(Box::new(|t| t[0].linear(&t[1]))), 1e-2);
    for (causal, tq) in [(true, 200), (false, 130)] {
        let mask = AttentionMask { causal, ..Default::default() };
        let shapes: [&[usize]; 3] = [&[2, 4, tq, 64], &[2, 2, 200, 64], &[2, 2, 200, 64]];
        agree(&dev, &format!("flash attention (causal {causal})"), &shapes, bf16(Box::new(move |t| Tensor::attention(&t[0], &t[1], &t[2], None, &mask))), 2e-2);
    }
}

#[test]
fn tensors_round_trip_and_device_errors_are_clear() {
    let Some((dev, _turn)) = backend() else { return };
    let x = Tensor::from_vec((0..12).map(|i| i as f32).collect(), &[3, 4]).unwrap();
    let g = x.to_device(&dev).unwrap();
    assert_eq!(g.device_name(), "cuda:0");
    assert_eq!(g.transpose(0, 1).unwrap().to_vec_f32().unwrap(), x.transpose(0, 1).unwrap().to_vec_f32().unwrap());
    for ty in [DType::F64, DType::BF16, DType::F16] {
        assert_eq!(g.to_dtype(ty).unwrap().to_cpu().unwrap().to_vec_f32().unwrap(), x.to_vec_f32().unwrap());
    }
    // The gradient of an upload comes back to the host.
    let leaf = x.clone().requires_grad(true);
    leaf.to_device(&dev).unwrap().sqrt().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(leaf.grad().unwrap().device().is_none());
    let mut p = g.detach();
    assert!(p.values_mut_f32().unwrap_err().to_string().contains("cuda:0"));
    let err = g.gather_rows(&[3]).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}
