//! Module behaviour: functional twins, parameters and freezing, save/load, dropout modes, quantized
//! Linear, and KV-cached decoding equal to a full forward for every positional encoding.

use augur_core::{no_grad, Bytes, DType, QuantType, Tensor};
use augur_nn::functional as F;
use augur_nn::gpt::{MlpKind, NormKind};
use augur_nn::layers::{Dropout, Linear};
use augur_nn::posenc::{PosKind, RopeScaling};
use augur_nn::{Gpt, GptConfig, Module, ModuleExt, Rng};

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
    }
}

fn tiny(pos: PosKind) -> Gpt {
    Gpt::new(GptConfig { dim: 32, n_layer: 2, n_head: 4, n_kv_head: 2, hidden: 48, max_seq: 64, pos, norm: NormKind::Rms, mlp: MlpKind::Swiglu, seed: 3, vocab: 50, tied: false, ..GptConfig::default() }).unwrap()
}

#[test]
fn linear_module_is_its_functional_twin_and_the_plain_formula() {
    let mut rng = Rng::new(0);
    let l = Linear::new(5, 3, true, 0.5, &mut rng);
    let x = Tensor::from_vec((0..10).map(|i| i as f32 * 0.1).collect(), &[2, 5]).unwrap();
    let y = l.forward(&x).unwrap();
    close(&y, &F::linear(&x, &l.weight, l.bias.as_ref()).unwrap(), 0.0);
    let plain = x.matmul(&l.weight.transpose(0, 1).unwrap()).unwrap().add(l.bias.as_ref().unwrap()).unwrap();
    close(&y, &plain, 1e-6);
}

#[test]
fn named_parameters_freeze_and_counts() {
    let mut m = tiny(PosKind::T5);
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"blocks.1.attn.wk.weight".to_string()) && names.contains(&"pos.relative_bias".to_string()), "{names:?}");
    let n = m.num_parameters();
    assert_eq!(n, m.named_parameters().iter().map(|(_, t)| t.numel()).sum::<usize>());
    m.freeze();
    assert!(m.named_parameters().iter().all(|(_, t)| !t.is_requires_grad()));
    let loss = m.loss(&[1, 2, 3], &[2, 3, 4], 1).unwrap();
    assert!(loss.backward().is_err(), "a frozen model records nothing");
    m.set_requires_grad(true);
    m.loss(&[1, 2, 3], &[2, 3, 4], 1).unwrap().backward().unwrap();
    assert!(m.named_parameters().iter().all(|(_, t)| t.grad().is_some()));
}

#[test]
fn save_then_load_restores_parameters_and_rejects_mismatches() {
    let dir = std::env::temp_dir().join(format!("augur-nn-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    let mut a = tiny(PosKind::Learned);
    a.save(&path).unwrap();
    let mut b = Gpt::new(GptConfig { seed: 99, ..a.config.clone() }).unwrap();
    let ids = [3, 1, 4, 1, 5];
    let before = no_grad(|| b.forward(&ids, 1, None)).unwrap();
    b.load(&path).unwrap();
    let (ya, yb) = no_grad(|| (a.forward(&ids, 1, None).unwrap(), b.forward(&ids, 1, None).unwrap()));
    close(&ya, &yb, 0.0);
    assert!(before.to_vec_f32().unwrap() != yb.to_vec_f32().unwrap());
    let mut wider = Gpt::new(GptConfig { hidden: 64, ..a.config.clone() }).unwrap();
    let err = wider.load(&path).unwrap_err().to_string();
    assert!(err.contains("shape") && err.contains("mlp"), "{err}");
    let mut other = tiny(PosKind::T5);
    assert!(other.load(&path).unwrap_err().to_string().contains("pos.relative_bias"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dropout_is_active_in_training_only() {
    let mut d = Dropout::new(0.5, 1);
    let x = Tensor::ones(&[1000]);
    let y = d.forward(&x).unwrap().to_vec_f32().unwrap();
    let zeros = y.iter().filter(|&&v| v == 0.0).count();
    assert!((400..600).contains(&zeros), "{zeros} of 1000 dropped");
    assert!(y.iter().all(|&v| v == 0.0 || v == 2.0), "survivors are scaled by 1/(1-p)");
    d.set_training(false);
    close(&d.forward(&x).unwrap(), &x, 0.0);
}

#[test]
fn quantized_linear_is_frozen_and_close_to_its_f32_weights() {
    let mut rng = Rng::new(5);
    let w: Vec<f32> = (0..4 * 64).map(|_| rng.normal() as f32 * 0.1).collect();
    let q: Vec<u8> = w.chunks(64).flat_map(|r| QuantType::Q8_0.quantize_row(r)).collect();
    let wq = Tensor::from_raw(DType::Quant(QuantType::Q8_0), Bytes::from_vec(q), &[4, 64]).unwrap();
    let lq = Linear::from_weights(wq, None);
    let lf = Linear::from_weights(Tensor::from_vec(w, &[4, 64]).unwrap(), None);
    let x = Tensor::from_vec((0..128).map(|i| (i as f32 * 0.37).sin()).collect(), &[2, 64]).unwrap().requires_grad(true);
    close(&lq.forward(&x).unwrap(), &lf.forward(&x).unwrap(), 2e-2);
    // The gradient reaches the input through the frozen quantized weight.
    lq.forward(&x).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().shape(), &[2, 64]);
}

#[test]
fn cached_decoding_equals_the_full_forward_for_every_position_encoding() {
    for pos in [PosKind::None, PosKind::Sinusoidal, PosKind::Learned, PosKind::Rope, PosKind::Alibi, PosKind::T5] {
        let mut m = tiny(pos);
        // Give T5's zero-initialised bias table some values.
        m.visit("", &mut |n, t| {
            if n == "pos.relative_bias" {
                let v: Vec<f32> = (0..t.numel()).map(|i| (i as f32 * 0.3).sin()).collect();
                *t = Tensor::from_vec(v, t.shape()).unwrap();
            }
        });
        let ids = [5u32, 9, 2, 7, 7, 1, 3];
        no_grad(|| {
            let full = m.forward(&ids, 1, None).unwrap();
            let mut caches = m.new_caches();
            let head = m.forward(&ids[..4], 1, Some(&mut caches)).unwrap();
            close(&head, &full.narrow(1, 0, 4).unwrap(), 1e-5);
            for (i, &id) in ids.iter().enumerate().skip(4) {
                let step = m.forward(&[id], 1, Some(&mut caches)).unwrap();
                close(&step, &full.narrow(1, i, 1).unwrap(), 1e-4);
            }
        });
    }
}

#[test]
fn rope_scaling_changes_only_long_range_behaviour() {
    let mut m = tiny(PosKind::Rope);
    let ids: Vec<u32> = (0..8).collect();
    let plain = no_grad(|| m.forward(&ids, 1, None)).unwrap();
    m.set_rope_scaling(RopeScaling::yarn(4.0, 64));
    let yarn = no_grad(|| m.forward(&ids, 1, None)).unwrap();
    // Position 0 is unrotated under any scaling, later positions move.
    close(&yarn.narrow(1, 0, 1).unwrap(), &plain.narrow(1, 0, 1).unwrap(), 0.2);
    assert!(yarn.to_vec_f32().unwrap() != plain.to_vec_f32().unwrap());
}

#[test]
fn bad_inputs_are_errors() {
    let m = tiny(PosKind::Learned);
    let err = m.forward(&[1, 2, 999], 1, None).unwrap_err().to_string();
    assert!(err.contains("999") && err.contains("vocabulary"), "{err}");
    let long: Vec<u32> = vec![1; 65];
    assert!(m.forward(&long, 1, None).unwrap_err().to_string().contains("learned position table"));
    assert!(m.forward(&[1, 2, 3], 2, None).is_err());
    assert!(GptConfig { n_head: 5, ..GptConfig::default() }.validate().is_err());
}
