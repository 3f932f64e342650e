//! MTP modules end to end on a tiny model augur writes itself: training lowers the loss and
//! does not lower held-out accuracy; the saved file loads to the same modules; the drafter's
//! incremental state (caches kept in step across rounds, draft positions on copies) drafts
//! what a from-scratch pass over every position drafts; and speculative decoding with the
//! modules equals plain greedy decoding token for token.

use std::ops::ControlFlow;

use augur_core::{no_grad, Tensor};
use augur_decode::speculative::mtp::{Mtp, MtpModules};
use augur_decode::speculative::{self, Ctx, Drafter, SpecConfig};
use augur_decode::sampler::argmax;
use augur_decode::{generate, GenerateConfig, Sampler, SamplerConfig};
use augur_distill::data::{self, DistillSet, Prompt};
use augur_distill::mtp::{self, MtpConfig};
use augur_models::{tiny, Activations, Logits, Model, State};

/// The chain a from-scratch pass drafts after `tokens` (the last one pending): every module
/// over all cached positions, without caches.
fn drafts_from_scratch(m: &MtpModules, model: &Model, tokens: &[u32]) -> Vec<u32> {
    let (n, dim) = (tokens.len() - 1, model.llama.cfg.dim);
    let mut st = State::new(&model.llama.cfg);
    st.activations = Activations::F32;
    model.llama.forward(&mut st, &tokens[..n], Logits::Hidden).unwrap();
    let mut h = Tensor::from_vec(st.hidden().to_vec(), &[1, n, dim]).unwrap();
    let mut seq = tokens.to_vec();
    let mut out = Vec::new();
    for (d, module) in m.modules.iter().enumerate() {
        let toks: Vec<u32> = (0..n).map(|i| seq[i + d + 1]).collect();
        let e = Tensor::from_vec(model.llama.embedding_rows(&toks).unwrap(), &[1, n, dim]).unwrap();
        h = no_grad(|| module.forward(&h, &e, &m.pos, None)).unwrap();
        let last = h.to_vec_f32().unwrap()[(n - 1) * dim..].to_vec();
        let l = no_grad(|| m.logits(&Tensor::from_vec(last, &[1, dim]).unwrap())).unwrap().to_vec_f32().unwrap();
        let best = m.vocab[argmax(&l) as usize];
        out.push(best);
        seq.push(best);
    }
    out
}

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
fn mtp_modules_train_save_draft_incrementally_and_decode_losslessly() {
    let (dir, model, prompts, set) = tiny_target("mtp-tiny", 11, 40, 24);
    let cfg = MtpConfig { depth: 2, vocab: 300, epochs: 8, lr: 2e-3, accumulate: 4, ..Default::default() };
    let mut losses = Vec::new();
    let mut trained = mtp::train(&model, &set, &cfg, |p| losses.push(p.loss)).unwrap();
    let (first, last) = (losses[..4].iter().sum::<f64>() / 4.0, losses[losses.len() - 4..].iter().sum::<f64>() / 4.0);
    assert!(last < 0.7 * first, "training loss should fall: {first:.3} -> {last:.3}");
    eprintln!("held-out top-1 per depth: before {:?}, after {:?}", trained.before, trained.after);
    assert_eq!(trained.after.len(), 2);
    assert!(trained.after[0] >= trained.before[0], "depth-1 accuracy should not drop: {:?} -> {:?}", trained.before, trained.after);

    // Saved and loaded: the same modules (the same from-scratch drafts).
    let file = dir.join("mtp.safetensors");
    trained.modules.save(&file).unwrap();
    let loaded = MtpModules::open(&file, &model.llama).unwrap();
    assert_eq!(loaded.depth(), 2);
    let ctx_tokens: Vec<u32> = vec![262, 40, 41, 100, 7, 8, 9, 13, 50, 51, 52, 70];
    assert_eq!(drafts_from_scratch(&loaded, &model, &ctx_tokens), drafts_from_scratch(&trained.modules, &model, &ctx_tokens));

    // Incremental drafting equals drafting from scratch, round after round.
    let mut drafter = Mtp::new(MtpModules::open(&file, &model.llama).unwrap());
    let mut st = State::new(&model.llama.cfg);
    st.activations = Activations::F32;
    let mut sampler = Sampler::new(SamplerConfig::default()).unwrap();
    let mut cached = 0;
    for end in [5usize, 6, 9, 12] {
        let tokens = &ctx_tokens[..end];
        // The target caches positions cached..end - 1; the drafter is given their states.
        model.llama.forward(&mut st, &tokens[cached..end - 1], Logits::Hidden).unwrap();
        let fresh = st.hidden().to_vec();
        cached = end - 1;
        let ctx = Ctx { tokens, target: &model.llama, state: &mut st, hidden: None, context_hidden: &fresh, k: 2, sampler: &mut sampler };
        let tree = drafter.propose(ctx).unwrap();
        let got = tree.tokens.clone();
        assert_eq!(got, drafts_from_scratch(&loaded, &model, tokens), "drafts after {end} tokens");
    }

    // Lossless: greedy speculative output equals plain greedy output (one drafter reused across
    // sequences, as a server would).
    let gen = GenerateConfig { max_tokens: 30, ignore_eos: true, ..Default::default() };
    let mut drafter = Mtp::new(MtpModules::open(&file, &model.llama).unwrap());
    for p in prompts.iter().step_by(9) {
        let plain = generate(&model, &p.ids, &gen, |_| ControlFlow::Continue(())).unwrap();
        let (s, stats) = speculative::generate(&model, &p.ids, &gen, &SpecConfig { throttle: false, ..SpecConfig::new(2) }, &mut drafter, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(s.generated, plain.generated, "MTP greedy output must equal plain greedy");
        assert!(stats.drafted > 0, "the modules drafted");
    }
    // Not an MTP file: a clear error.
    let e = MtpModules::open(&dir.join("target.gguf"), &model.llama).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("not an MTP modules file") || e.contains("safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Training on the GPU follows the CPU's run: the same losses step by step (up to rounding) and
/// the same held-out accuracy, and the modules come back to the host (skipped without a device).
#[test]
fn mtp_modules_train_the_same_on_the_gpu() {
    let dev = match augur_cuda::train::backend(0) {
        Ok(d) => d,
        Err(e) => return eprintln!("skipped: GPU training needs a CUDA device ({e})"),
    };
    let (dir, model, _, set) = tiny_target("mtp-gpu", 11, 24, 16);
    let cfg = MtpConfig { depth: 2, vocab: 300, epochs: 2, lr: 2e-3, accumulate: 4, ..Default::default() };
    let run = |device| {
        let mut losses = Vec::new();
        let t = mtp::train(&model, &set, &MtpConfig { device, ..cfg.clone() }, |p| losses.push(p.loss)).unwrap();
        let mut on_host = true;
        let mut modules = t.modules;
        augur_nn::Module::visit(&mut modules, "", &mut |_, p| on_host &= p.device().is_none());
        assert!(on_host, "trained modules come back to the host");
        (losses, t.after)
    };
    let (cpu, cpu_acc) = run(None);
    let (gpu, gpu_acc) = run(Some(dev));
    for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
        assert!((a - b).abs() <= 2e-3 * b.abs().max(1.0), "step {i}: GPU loss {a} vs CPU {b}");
    }
    for (a, b) in gpu_acc.iter().zip(&cpu_acc) {
        assert!((a - b).abs() < 0.05, "held-out accuracy: GPU {gpu_acc:?} vs CPU {cpu_acc:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
