//! One training step of a tiny GPT equals PyTorch's: the loss, every parameter's gradient and the
//! parameters after gradient clipping and AdamW, against golden files made by
//! `tools/torch_golden.py` (committed; rerun it with torch installed to regenerate).

use std::path::PathBuf;

use augur_core::{DType, Device, Tensor};
use augur_formats::safetensors::Checkpoint;
use augur_nn::optim::{clip_grad_norm, AdamW, Optimizer};
use augur_nn::{Gpt, GptConfig, Module, ModuleExt};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Largest elementwise difference relative to the tensor's largest magnitude (at least 1e-4:
/// some gradients are zero in exact arithmetic, such as a key bias's, and both sides hold
/// rounding noise there).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-4);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

fn check(name: &str, dev: Option<&Device>) {
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data(&format!("golden_{name}.json"))).unwrap()).unwrap();
    let train = cfg.as_object_mut().unwrap().remove("train").unwrap();
    let cfg: GptConfig = serde_json::from_value(cfg).unwrap();
    let ck = Checkpoint::open(&data(&format!("golden_{name}.safetensors"))).unwrap();
    let mut model = Gpt::new(cfg.clone()).unwrap();
    let mut loaded = 0;
    model.visit("", &mut |n, t| {
        *t = ck.get(&format!("param.{n}")).unwrap_or_else(|_| panic!("golden file lacks {n}")).to_dtype(DType::F32).unwrap().requires_grad(true);
        loaded += 1;
    });
    assert_eq!(loaded, ck.names().filter(|n| n.starts_with("param.")).count(), "parameter sets differ");
    model.to_device(dev).unwrap();
    let ids: Vec<u32> = ck.get("ids").unwrap().to_vec_f32().unwrap().iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = ck.get("targets").unwrap().to_vec_f32().unwrap().iter().map(|&x| x as u32).collect();
    let batch = train["batch"].as_u64().unwrap() as usize;

    let loss = model.loss(&ids, &targets, batch).unwrap();
    let want = ck.get("loss").unwrap().to_vec_f32().unwrap()[0];
    assert!(((loss.item().unwrap() - want) / want).abs() < 1e-5, "{name}: loss {} vs torch {want}", loss.item().unwrap());
    loss.backward().unwrap();
    for (n, p) in model.named_parameters() {
        let e = rel_err(&p.grad().unwrap(), &ck.get(&format!("grad.{n}")).unwrap());
        assert!(e < 1e-4, "{name}: gradient of {n} off by {e:.2e} (relative)");
    }
    clip_grad_norm(&mut model, train["clip"].as_f64().unwrap()).unwrap();
    let b = &train["betas"];
    let mut opt = AdamW::new(train["lr"].as_f64().unwrap(), (b[0].as_f64().unwrap(), b[1].as_f64().unwrap()), train["eps"].as_f64().unwrap(), train["weight_decay"].as_f64().unwrap());
    opt.step(&mut model).unwrap();
    for (n, p) in model.named_parameters() {
        // A gradient that is zero in exact arithmetic (the key bias: softmax ignores a score
        // shift shared by every key) is rounding noise on both sides, and Adam's normalisation
        // turns noise of 1e-10 into an update of lr × noise / (|noise| + eps): not comparable.
        let g = ck.get(&format!("grad.{n}")).unwrap().to_vec_f64().unwrap();
        if g.iter().all(|x| x.abs() < 1e-6) {
            continue;
        }
        let e = rel_err(&p, &ck.get(&format!("new.{n}")).unwrap());
        assert!(e < 1e-4, "{name}: {n} after AdamW off by {e:.2e} (relative)");
    }
}

#[test]
fn llama_style_step_equals_pytorch() {
    check("llama", None);
}

#[test]
fn gpt2_style_step_equals_pytorch() {
    check("gpt2", None);
}

/// The same steps with the model, its gradients and AdamW on a CUDA device (skipped without one).
#[test]
fn steps_on_the_gpu_equal_pytorch() {
    let dev = match augur_cuda::train::backend(0) {
        Ok(d) => d,
        Err(e) => return eprintln!("skipped: the GPU golden steps need a CUDA device ({e})"),
    };
    check("llama", Some(&dev));
    check("gpt2", Some(&dev));
}
