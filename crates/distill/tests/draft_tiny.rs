//! Draft-model distillation end to end on a tiny model augur writes itself: the draft built from
//! all of the target's blocks computes the target's own logits (the weight mapping and the q/k
//! row order are right); distilling a one-block draft lowers its held-out KL divergence from the
//! target; the written GGUF loads as a model with the target's tokenizer, and speculative
//! decoding with it equals plain greedy decoding token for token.

use std::ops::ControlFlow;

use augur_decode::speculative::{self, DraftModel, SpecConfig};
use augur_decode::{generate, GenerateConfig, SamplerConfig};
use augur_distill::data::{self, DistillSet, Prompt};
use augur_distill::draft::{self, DraftConfig};
use augur_models::{tiny, Activations, Logits, Model, State};

#[test]
fn distilled_draft_matches_the_target_better_and_decodes_losslessly() {
    let dir = std::env::temp_dir().join(format!("augur-draft-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("target.gguf");
    tiny::write_gguf(&path, false, Some(augur_core::QuantType::Q8_0), 11).unwrap();
    let model = Model::open(&path).unwrap();

    // The whole target as a draft: the same function.
    let ids: Vec<u32> = vec![262, 40, 41, 100, 7, 8, 9, 13];
    let full = draft::from_target(&model, model.llama.cfg.n_layer).unwrap();
    let got = augur_core::no_grad(|| full.forward(&ids, 1, None)).unwrap().to_vec_f32().unwrap();
    let mut st = State::new(&model.llama.cfg);
    st.activations = Activations::F32;
    let want = model.llama.forward(&mut st, &ids, Logits::All).unwrap().to_vec();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3 * scale, "full-depth draft vs target logits: max diff {diff} (scale {scale})");

    let prompts: Vec<Prompt> = (0..40u32).map(|i| Prompt { group: "t".into(), ids: (0..3 + i % 4).map(|j| 40 + (i * 7 + j * 13) % 150).collect() }).collect();
    let samples = data::respond(&model, &prompts, 24, SamplerConfig::default(), |_, _| {}).unwrap();
    let set = DistillSet { samples, hidden: None, dim: 0 };
    let cfg = DraftConfig { layers: 1, epochs: 12, lr: 1e-3, accumulate: 4, ..Default::default() };
    let (mut steps, mut losses) = (0, Vec::new());
    let mut trained = draft::train(&model, &set, &cfg, |p| {
        steps = p.step;
        losses.push(p.loss);
    })
    .unwrap();
    let (first, last) = (losses[..5].iter().sum::<f64>() / 5.0, losses[losses.len() - 5..].iter().sum::<f64>() / 5.0);
    assert!(last < 0.5 * first, "training KL should fall: {first:.3} -> {last:.3}");
    assert_eq!(steps, 38usize.div_ceil(4) * 12);
    let (b, a) = (trained.before, trained.after);
    eprintln!("held out: before {b:?}, after {a:?}");
    assert!(b.positions > 0 && a.positions == b.positions);
    assert!(a.kl < 0.85 * b.kl, "distillation should lower the held-out KL: {:.4} -> {:.4}", b.kl, a.kl);
    assert!(a.agreement >= b.agreement, "top-1 agreement should not drop: {:.3} -> {:.3}", b.agreement, a.agreement);

    let out = dir.join("draft.gguf");
    draft::write_gguf(&model, &mut trained.gpt, &out).unwrap();
    let d = Model::open(&out).unwrap();
    assert_eq!(d.llama.cfg.n_layer, 1);
    // The file computes what the trained draft computes (up to its Q8_0 blocks).
    let got = {
        let mut st = State::new(&d.llama.cfg);
        st.activations = Activations::F32;
        d.llama.forward(&mut st, &ids, Logits::All).unwrap().to_vec()
    };
    let want = augur_core::no_grad(|| trained.gpt.forward(&ids, 1, None)).unwrap().to_vec_f32().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 2e-2 * scale, "written draft vs trained draft: max diff {diff} (scale {scale})");
    assert_eq!(d.tokenizer.encode("hello world").unwrap(), model.tokenizer.encode("hello world").unwrap());

    let gen = GenerateConfig { max_tokens: 30, ignore_eos: true, ..Default::default() };
    for p in prompts.iter().step_by(9) {
        let plain = generate(&model, &p.ids, &gen, |_| ControlFlow::Continue(())).unwrap();
        let mut drafter = DraftModel::new(Model::open(&out).unwrap(), &model).unwrap();
        let (s, _) = speculative::generate(&model, &p.ids, &gen, &SpecConfig { throttle: false, ..SpecConfig::new(4) }, &mut drafter, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(s.generated, plain.generated, "draft-model greedy output must equal plain greedy");
    }
    // A qwen2 target (attention biases) is refused with a clear error.
    let q = dir.join("qwen.gguf");
    tiny::write_gguf_arch(&q, "qwen2", true, None, 3).unwrap();
    let e = draft::from_target(&Model::open(&q).unwrap(), 1).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("qwen2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Distilling on the GPU follows the host's run: the same KL step by step (up to rounding), the
/// same held-out KL and agreement, and the draft comes back to the host (skipped without a
/// device).
#[test]
fn the_draft_distils_the_same_on_the_gpu() {
    let dev = match augur_cuda::train::backend(0) {
        Ok(d) => d,
        Err(e) => return eprintln!("skipped: GPU training needs a CUDA device ({e})"),
    };
    let dir = std::env::temp_dir().join(format!("augur-draft-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("target.gguf");
    tiny::write_gguf(&path, false, Some(augur_core::QuantType::Q8_0), 11).unwrap();
    let model = Model::open(&path).unwrap();
    let prompts: Vec<Prompt> = (0..16u32).map(|i| Prompt { group: "t".into(), ids: (0..3 + i % 4).map(|j| 40 + (i * 7 + j * 13) % 150).collect() }).collect();
    let samples = data::respond(&model, &prompts, 16, SamplerConfig::default(), |_, _| {}).unwrap();
    let set = DistillSet { samples, hidden: None, dim: 0 };
    let cfg = DraftConfig { layers: 1, epochs: 3, lr: 1e-3, accumulate: 4, ..Default::default() };
    let run = |device| {
        let mut losses = Vec::new();
        let mut t = draft::train(&model, &set, &DraftConfig { device, ..cfg.clone() }, |p| losses.push(p.loss)).unwrap();
        let mut on_host = true;
        augur_nn::Module::visit(&mut t.gpt, "", &mut |_, p| on_host &= p.device().is_none());
        assert!(on_host, "the trained draft comes back to the host");
        (losses, t.after)
    };
    let (cpu, cpu_after) = run(None);
    let (gpu, gpu_after) = run(Some(dev));
    assert_eq!(cpu.len(), gpu.len());
    for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
        assert!((a - b).abs() <= 2e-3 * b.abs().max(1.0), "step {i}: GPU KL {a} vs host {b}");
    }
    assert!((gpu_after.kl - cpu_after.kl).abs() <= 2e-3 * cpu_after.kl.max(1.0), "held-out KL: GPU {gpu_after:?} vs host {cpu_after:?}");
    assert!((gpu_after.agreement - cpu_after.agreement).abs() < 0.05, "held-out agreement: GPU {gpu_after:?} vs host {cpu_after:?}");
    std::fs::remove_dir_all(&dir).ok();
}
