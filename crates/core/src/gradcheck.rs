//! Finite-difference gradient checks (as `torch.autograd.gradcheck`), in f64, for every
//! differentiable op in the registry, over random shapes with broadcasting and with strided
//! (transposed) inputs, on the host or on a device: the CPU tests and each backend's tests run
//! the same cases.

use crate::registry::OPS;
use crate::{no_grad, AttentionMask, DType, Device, Result, Tensor, UnaryOp};

/// The checks' random numbers (SplitMix64), seeded by its field.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.bits() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn size(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.bits() as usize) % (hi - lo + 1)
    }
    /// Values in ±[lo, hi] (kept away from zero where an op has a kink or pole there).
    pub fn vals(&mut self, n: usize, lo: f64, hi: f64, signed: bool) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let m = lo + (hi - lo) * self.unit();
                if signed && self.bits().is_multiple_of(2) { -m } else { m }
            })
            .collect()
    }
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
type MakeCase = Box<dyn Fn(&mut Rng) -> Case>;

/// One check: leaf shapes and values, and the op applied to them.
struct Case {
    leaves: Vec<(Vec<usize>, Vec<f64>)>,
    f: Op,
}

fn leaf(shape: &[usize], v: Vec<f64>) -> (Vec<usize>, Vec<f64>) {
    (shape.to_vec(), v)
}

fn normal(r: &mut Rng, shape: &[usize]) -> (Vec<usize>, Vec<f64>) {
    let n = shape.iter().product();
    leaf(shape, r.vals(n, 0.0, 1.5, true))
}

fn away(r: &mut Rng, shape: &[usize], signed: bool) -> (Vec<usize>, Vec<f64>) {
    let n = shape.iter().product();
    leaf(shape, r.vals(n, 0.3, 1.5, signed))
}

/// A broadcast partner for shape `s`: the same shape, a suffix, or with some dims set to 1.
fn partner(r: &mut Rng, s: &[usize]) -> Vec<usize> {
    match r.bits() % 4 {
        0 => s.to_vec(),
        1 => s[1..].to_vec(),
        2 => s.iter().map(|&d| if r.bits().is_multiple_of(2) { 1 } else { d }).collect(),
        _ => vec![1],
    }
}

fn unary(op: UnaryOp, kink: bool, positive: bool) -> impl Fn(&mut Rng) -> Case {
    move |r| {
        let s = [r.size(1, 4), r.size(1, 5)];
        let x = if positive { away(r, &s, false) } else if kink { away(r, &s, true) } else { normal(r, &s) };
        Case { leaves: vec![x], f: Box::new(move |t| t[0].unary(op)) }
    }
}

fn binary(f: fn(&Tensor, &Tensor) -> Result<Tensor>, denominator: bool) -> impl Fn(&mut Rng) -> Case {
    move |r| {
        let s = vec![r.size(1, 3), r.size(1, 4)];
        let p = partner(r, &s);
        let (a, b) = if r.bits() % 2 == 0 { (s, p) } else { (p, s) };
        let b = if denominator { away(r, &b, true) } else { normal(r, &b) };
        Case { leaves: vec![normal(r, &a), b], f: Box::new(move |t| f(&t[0], &t[1])) }
    }
}

fn attention_case(r: &mut Rng) -> Case {
    let (b, hk, g, tq, d) = (r.size(1, 2), r.size(1, 2), r.size(1, 2), r.size(1, 4), r.size(1, 4));
    let tk = tq + r.size(0, 3);
    let h = hk * g;
    let causal = r.bits().is_multiple_of(2);
    let allow: Option<std::sync::Arc<[bool]>> = r.bits().is_multiple_of(2).then(|| (0..tq * tk).map(|i| i % 3 != 1 || i == 0).collect());
    let alibi = r.bits().is_multiple_of(2).then(|| (0..h).map(|i| 0.25 * (i + 1) as f32).collect());
    let biased = r.bits().is_multiple_of(2);
    let mask = AttentionMask { causal, allow, alibi, scale: None };
    let mut leaves = vec![normal(r, &[b, h, tq, d]), normal(r, &[b, hk, tk, d]), normal(r, &[b, hk, tk, d])];
    if biased {
        leaves.push(normal(r, &[h, tq, tk]));
    }
    Case { leaves, f: Box::new(move |t| Tensor::attention(&t[0], &t[1], &t[2], t.get(3), &mask)) }
}

fn case_for(name: &str) -> Option<MakeCase> {
    Some(match name {
        "tensor.abs" => Box::new(unary(UnaryOp::Abs, true, false)),
        "tensor.exp" => Box::new(unary(UnaryOp::Exp, false, false)),
        "tensor.log" => Box::new(unary(UnaryOp::Log, false, true)),
        "tensor.neg" => Box::new(unary(UnaryOp::Neg, false, false)),
        "tensor.recip" => Box::new(unary(UnaryOp::Recip, true, false)),
        "tensor.sqr" => Box::new(unary(UnaryOp::Sqr, false, false)),
        "tensor.sqrt" => Box::new(unary(UnaryOp::Sqrt, false, true)),
        "nn.functional.gelu" => Box::new(unary(UnaryOp::Gelu, false, false)),
        "nn.functional.relu" => Box::new(unary(UnaryOp::Relu, true, false)),
        "nn.functional.sigmoid" => Box::new(unary(UnaryOp::Sigmoid, false, false)),
        "nn.functional.silu" => Box::new(unary(UnaryOp::Silu, false, false)),
        "nn.functional.tanh" => Box::new(unary(UnaryOp::Tanh, false, false)),
        "tensor.add" => Box::new(binary(Tensor::add, false)),
        "tensor.sub" => Box::new(binary(Tensor::sub, false)),
        "tensor.mul" => Box::new(binary(Tensor::mul, false)),
        "tensor.div" => Box::new(binary(Tensor::div, true)),
        "tensor.maximum" => Box::new(binary(Tensor::maximum, false)),
        "tensor.affine" => Box::new(|r: &mut Rng| Case { leaves: vec![normal(r, &[2, 3])], f: Box::new(|t| t[0].affine(-1.7, 0.4)) }),
        "tensor.sum_all" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); normal(r, &[d0, 4]) }], f: Box::new(|t| t[0].sum_all()) }),
        "tensor.mean_all" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 4); normal(r, &[3, d0]) }], f: Box::new(|t| t[0].mean_all()) }),
        "tensor.sum_last" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); let d1 = r.size(1, 5); normal(r, &[d0, d1]) }], f: Box::new(|t| t[0].sum_last()) }),
        "tensor.mean_last" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); let d1 = r.size(1, 5); normal(r, &[d0, d1]) }], f: Box::new(|t| t[0].mean_last()) }),
        "tensor.sum_to" => Box::new(|r: &mut Rng| {
            let s = [r.size(1, 3), r.size(1, 3), r.size(1, 3)];
            let to = partner(r, &s);
            Case { leaves: vec![normal(r, &s)], f: Box::new(move |t| t[0].sum_to(&to)) }
        }),
        "tensor.broadcast_to" => Box::new(|r: &mut Rng| {
            let s = vec![r.size(1, 3), r.size(1, 3)];
            let small = partner(r, &s);
            Case { leaves: vec![normal(r, &small)], f: Box::new(move |t| t[0].broadcast_to(&s)) }
        }),
        "tensor.reshape" => Box::new(|r: &mut Rng| {
            let (a, b) = (r.size(1, 3), r.size(1, 4));
            Case { leaves: vec![normal(r, &[a, b, 2])], f: Box::new(move |t| t[0].reshape(&[b * 2, a])) }
        }),
        "tensor.transpose" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); normal(r, &[2, d0, 3]) }], f: Box::new(|t| t[0].transpose(0, 2)) }),
        "tensor.contiguous" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); normal(r, &[d0, 3]) }], f: Box::new(|t| t[0].transpose(0, 1)?.contiguous()) }),
        "tensor.narrow" => Box::new(|r: &mut Rng| {
            let n = r.size(2, 5);
            let (start, len) = (r.size(0, n - 1), 1);
            Case { leaves: vec![normal(r, &[3, n])], f: Box::new(move |t| t[0].narrow(1, start, len)) }
        }),
        "tensor.pad" => Box::new(|r: &mut Rng| {
            let start = r.size(0, 2);
            Case { leaves: vec![normal(r, &[2, 3])], f: Box::new(move |t| t[0].pad(0, start, 2 + start + 1)) }
        }),
        "tensor.cat" => Box::new(|r: &mut Rng| {
            let dim = r.size(0, 1);
            let mut s2 = [2, 3];
            s2[dim] = r.size(1, 3);
            Case { leaves: vec![normal(r, &[2, 3]), normal(r, &s2)], f: Box::new(move |t| Tensor::cat(&[&t[0], &t[1]], dim)) }
        }),
        "tensor.matmul" => Box::new(|r: &mut Rng| {
            let (b, m, k, n) = (r.size(1, 3), r.size(1, 4), r.size(1, 4), r.size(1, 4));
            let rhs = if r.bits().is_multiple_of(2) { vec![b, k, n] } else { vec![k, n] };
            Case { leaves: vec![normal(r, &[b, m, k]), normal(r, &rhs)], f: Box::new(|t| t[0].matmul(&t[1])) }
        }),
        "nn.functional.linear" => Box::new(|r: &mut Rng| {
            let (n, k, o) = (r.size(1, 4), r.size(1, 5), r.size(1, 4));
            Case { leaves: vec![normal(r, &[2, n, k]), normal(r, &[o, k])], f: Box::new(|t| t[0].linear(&t[1])) }
        }),
        "nn.functional.softmax" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); let d1 = r.size(1, 6); normal(r, &[d0, d1]) }], f: Box::new(|t| t[0].softmax_last()) }),
        "nn.functional.log_softmax" => Box::new(|r: &mut Rng| Case { leaves: vec![{ let d0 = r.size(1, 3); let d1 = r.size(1, 6); normal(r, &[d0, d1]) }], f: Box::new(|t| t[0].log_softmax_last()) }),
        "nn.functional.rms_norm" => Box::new(|r: &mut Rng| {
            let n = r.size(1, 6);
            Case { leaves: vec![{ let d0 = r.size(1, 3); normal(r, &[d0, n]) }, normal(r, &[n])], f: Box::new(|t| t[0].rms_norm(&t[1], 1e-5)) }
        }),
        "nn.functional.layer_norm" => Box::new(|r: &mut Rng| {
            let n = r.size(2, 6);
            Case { leaves: vec![{ let d0 = r.size(1, 3); normal(r, &[d0, n]) }, normal(r, &[n]), normal(r, &[n])], f: Box::new(|t| t[0].layer_norm(&t[1], &t[2], 1e-5)) }
        }),
        "nn.functional.embedding" => Box::new(|r: &mut Rng| {
            let rows = r.size(2, 5);
            let ids: Vec<u32> = (0..r.size(1, 6)).map(|_| (r.bits() % rows as u64) as u32).collect();
            Case { leaves: vec![normal(r, &[rows, 3])], f: Box::new(move |t| t[0].gather_rows(&ids)) }
        }),
        "nn.functional.cross_entropy" => Box::new(|r: &mut Rng| {
            let (n, c) = (r.size(1, 5), r.size(2, 6));
            let mut targets: Vec<u32> = (0..n).map(|_| (r.bits() % c as u64) as u32).collect();
            targets[0] = 999; // ignored
            Case { leaves: vec![normal(r, &[n, c])], f: Box::new(move |t| t[0].cross_entropy(&targets, Some(999))) }
        }),
        "nn.functional.rope" => Box::new(|r: &mut Rng| {
            let (seq, half) = (r.size(1, 4), r.size(1, 3));
            let interleaved = r.bits().is_multiple_of(2);
            let ang: Vec<f64> = (0..seq * half).map(|i| (i as f64) * 0.37).collect();
            let cos = Tensor::from_f64(ang.iter().map(|a| a.cos()).collect(), &[seq, half]).unwrap();
            let sin = Tensor::from_f64(ang.iter().map(|a| a.sin()).collect(), &[seq, half]).unwrap();
            Case { leaves: vec![normal(r, &[2, seq, 2 * half])], f: Box::new(move |t| t[0].rope(&cos, &sin, interleaved)) }
        }),
        "nn.functional.attention" => Box::new(attention_case),
        "tensor.to_dtype" => Box::new(|r: &mut Rng| Case { leaves: vec![normal(r, &[2, 3])], f: Box::new(|t| t[0].to_dtype(DType::F64)?.sqr_helper()) }),
        _ => return None,
    })
}

trait Sqr {
    fn sqr_helper(&self) -> Result<Tensor>;
}
impl Sqr for Tensor {
    fn sqr_helper(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqr)
    }
}

/// Build the op's inputs from leaves: each leaf of rank ≥ 2 may be stored transposed and viewed
/// back, so the op sees a strided input.
fn inputs(leaves: &[Tensor], strided: bool) -> Result<Vec<Tensor>> {
    leaves.iter().map(|l| if strided && l.rank() >= 2 { l.transpose(l.rank() - 2, l.rank() - 1) } else { Ok(l.clone()) }).collect()
}

fn make_leaves(case: &Case, strided: bool, values: &[Vec<f64>], dev: Option<&Device>) -> Result<Vec<Tensor>> {
    case.leaves
        .iter()
        .zip(values)
        .map(|((shape, _), v)| {
            let r = shape.len();
            let t = if strided && r >= 2 {
                // Store the transpose; `inputs` views it back to `shape`.
                let mut ts = shape.clone();
                ts.swap(r - 2, r - 1);
                let t = Tensor::from_f64(v.clone(), shape)?.transpose(r - 2, r - 1)?.contiguous()?;
                Tensor::from_f64(t.to_vec_f64()?, &ts)?
            } else {
                Tensor::from_f64(v.clone(), shape)?
            };
            // A leaf on `dev` (or the host) that requires a gradient.
            Ok(t.to(dev)?.detach().requires_grad(true))
        })
        .collect()
}

fn check(name: &str, case: &Case, strided: bool, r: &mut Rng, dev: Option<&Device>) -> Result<std::result::Result<(), String>> {
    let values: Vec<Vec<f64>> = case.leaves.iter().map(|(_, v)| v.clone()).collect();
    let leaves = make_leaves(case, strided, &values, dev)?;
    let out = (case.f)(&inputs(&leaves, strided)?)?;
    let weights = Tensor::from_f64(r.vals(out.numel(), 0.2, 1.0, true), out.shape())?;
    out.mul(&weights)?.sum_all()?.backward()?;
    let loss = |vals: &[Vec<f64>]| -> Result<f64> {
        no_grad(|| {
            let l = make_leaves(case, strided, vals, dev)?;
            let o = (case.f)(&inputs(&l, strided)?)?;
            Ok(o.mul(&weights)?.sum_all()?.to_vec_f64()?[0])
        })
    };
    let eps = 1e-6;
    for (li, l) in leaves.iter().enumerate() {
        let g = match l.grad() {
            Some(g) => g.to_vec_f64()?,
            None => vec![0.0; l.numel()],
        };
        // The gradient is of the stored leaf, laid out like it (transposed when strided).
        let stored = l.to_vec_f64()?;
        let rank = l.rank();
        let back = |s: Vec<f64>| -> Result<Vec<f64>> {
            if strided && rank >= 2 {
                Tensor::from_f64(s, l.shape())?.transpose(rank - 2, rank - 1)?.to_vec_f64()
            } else {
                Ok(s)
            }
        };
        for (e, &ga) in g.iter().enumerate() {
            let mut plus = stored.clone();
            let mut minus = stored.clone();
            plus[e] += eps;
            minus[e] -= eps;
            let mut vp = values.clone();
            vp[li] = back(plus)?;
            let mut vm = values.clone();
            vm[li] = back(minus)?;
            let num = (loss(&vp)? - loss(&vm)?) / (2.0 * eps);
            if (ga - num).abs() > 1e-6 + 1e-5 * num.abs() {
                return Ok(Err(format!("{name} (strided {strided}): input {li} element {e}: analytic {ga} vs numeric {num}")));
            }
        }
    }
    Ok(Ok(()))
}

/// Check every differentiable op of the registry on `dev` (the host for `None`): six random
/// cases each, half with strided inputs. The first mismatch, or an op without a check, is the
/// error.
pub fn check_every_op(dev: Option<&Device>) -> std::result::Result<(), String> {
    let mut r = Rng(42);
    let mut missing = vec![];
    for op in OPS {
        match (op.differentiable, case_for(op.name)) {
            (true, Some(make)) => {
                for seed in 0..6 {
                    let case = make(&mut r);
                    check(op.name, &case, seed % 2 == 1, &mut r, dev).map_err(|e| format!("{}: {e}", op.name))??;
                }
            }
            (true, None) => missing.push(op.name),
            (false, Some(_)) => return Err(format!("{} is marked not differentiable but has a check", op.name)),
            (false, None) => {}
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("differentiable ops without a gradient check: {missing:?}"))
    }
}


