//! Medusa end to end on a tiny model augur writes itself: self-distillation data (responses and
//! hidden states, saved and read back), head training that lowers the loss and beats chance on
//! held-out positions, and decoding with the trained heads that equals plain greedy decoding
//! token for token while accepting drafts.

use std::ops::ControlFlow;

use augur_decode::speculative::medusa::{save_heads, Medusa, MedusaHeads};
use augur_decode::speculative::{self, SpecConfig};
use augur_decode::{generate, GenerateConfig, SamplerConfig};
use augur_distill::data::{self, DistillSet, Prompt};
use augur_distill::medusa::{self as train, MedusaConfig};
use augur_models::{tiny, Model};

/// A tiny target written to a fresh directory named for `name`, `n` prompts of 3-6 tokens, and
/// their greedy responses of `len` tokens with hidden states.
fn tiny_target(name: &str, seed: u64, n: u32, len: usize) -> (std::path::PathBuf, Model, Vec<Prompt>, DistillSet) {
    let dir = std::env::temp_dir().join(format!("augur-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("target.gguf");
    tiny::write_gguf(&path, false, Some(augur_core::QuantType::Q8_0), seed).unwrap();
    let model = Model::open(&path).unwrap();
    let prompts: Vec<Prompt> = (0..n).map(|i| Prompt { group: "t".into(), ids: (0..3 + i % 4).map(|j| 40 + (i * 7 + j * 13) % 150).collect() }).collect();
    let samples = data::respond(&model, &prompts, len, SamplerConfig::default(), |_, _| {}).unwrap();
    let hidden = data::hidden_states(&model.llama, &samples, |_, _| {}).unwrap();
    let set = DistillSet { samples, hidden: Some(hidden), dim: model.llama.cfg.dim };
    (dir, model, prompts, set)
}

#[test]
fn trained_heads_learn_and_decode_losslessly() {
    // 40 prompts of 3-6 tokens; greedy responses of 24 tokens.
    let (dir, model, prompts, set) = tiny_target("medusa-tiny", 5, 40, 24);
    assert!(set.samples.iter().all(|s| s.ids.len() > s.prompt_len), "every prompt got a response");
    set.save(&dir.join("data")).unwrap();
    let set = DistillSet::open(&dir.join("data")).unwrap();
    assert_eq!(set.samples.len(), 40);

    let cfg = MedusaConfig { heads: 2, vocab: 64, epochs: 30, batch: 64, lr: 3e-3, ..Default::default() };
    let mut losses = Vec::new();
    let trained = train::train(&model.llama, &set, &cfg, |p| losses.push(p.loss)).unwrap();
    let (first, last) = (losses[..3].iter().sum::<f64>() / 3.0, losses[losses.len() - 3..].iter().sum::<f64>() / 3.0);
    assert!(last < 0.7 * first, "training should lower the loss: {first:.3} -> {last:.3}");
    // Chance for a head scoring 64 tokens is 1/64; a learnt head is far above it.
    assert!(trained.accuracy[0][0] > 0.2, "held-out top-1 of head 0: {:?}", trained.accuracy);

    let file = dir.join("heads.safetensors");
    save_heads(&file, &trained.heads, model.llama.cfg.dim, &trained.vocab, &trained.accuracy).unwrap();
    let heads = MedusaHeads::open(&file, &model.llama).unwrap();
    assert_eq!(heads.n_heads(), 2);

    let gen = GenerateConfig { max_tokens: 30, ignore_eos: true, ..Default::default() };
    let mut accepted = 0.0;
    for p in prompts.iter().step_by(7) {
        let plain = generate(&model, &p.ids, &gen, |_| ControlFlow::Continue(())).unwrap();
        let mut drafter = Medusa::new(heads.clone(), 6);
        let (s, stats) = speculative::generate(&model, &p.ids, &gen, &SpecConfig { throttle: false, ..SpecConfig::new(6) }, &mut drafter, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(s.generated, plain.generated, "Medusa greedy output must equal plain greedy");
        accepted += stats.tau();
    }
    assert!(accepted / 6.0 > 1.2, "trained heads should get drafts accepted: mean tau {:.2}", accepted / 6.0);

    // A safetensors file that holds no heads is refused with a clear error.
    let junk = dir.join("junk.safetensors");
    let t = augur_core::Tensor::from_vec(vec![0.0; 4], &[4]).unwrap();
    augur_formats::safetensors::save(&junk, &[("x", &t)]).unwrap();
    let err = MedusaHeads::open(&junk, &model.llama).unwrap_err().to_string();
    assert!(err.contains("not a Medusa heads file"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Training on the GPU follows the CPU's run: the same losses step by step (up to rounding) and
/// the same held-out accuracy (skipped without a CUDA device).
#[test]
fn heads_train_the_same_on_the_gpu() {
    let dev = match augur_cuda::train::backend(0) {
        Ok(d) => d,
        Err(e) => return eprintln!("skipped: GPU training needs a CUDA device ({e})"),
    };
    let (dir, model, _, set) = tiny_target("medusa-gpu", 5, 40, 24);
    let cfg = MedusaConfig { heads: 2, vocab: 64, epochs: 6, batch: 64, lr: 3e-3, ..Default::default() };
    let run = |device| {
        let mut losses = Vec::new();
        let t = train::train(&model.llama, &set, &MedusaConfig { device, ..cfg.clone() }, |p| losses.push(p.loss)).unwrap();
        (losses, t.accuracy)
    };
    let (cpu, cpu_acc) = run(None);
    let (gpu, gpu_acc) = run(Some(dev));
    for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
        assert!((a - b).abs() <= 2e-3 * b.abs().max(1.0), "step {i}: GPU loss {a} vs CPU {b}");
    }
    for (a, b) in gpu_acc.iter().flatten().zip(cpu_acc.iter().flatten()) {
        assert!((a - b).abs() < 0.03, "held-out accuracy: GPU {gpu_acc:?} vs CPU {cpu_acc:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
