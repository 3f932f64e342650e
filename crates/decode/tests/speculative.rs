//! Speculative decoding is lossless: greedy output equals plain greedy output token for token, on
//! the real default model, for every drafter (prompt lookup as a chain and as a tree, early exit,
//! and a draft model made of the target's first layers, written as a GGUF by augur).

use std::ops::ControlFlow;
use std::path::PathBuf;

use augur_decode::speculative::{self, DraftModel, Drafter, EarlyExit, PromptLookup, SpecConfig};
use augur_decode::{generate, GenerateConfig, SamplerConfig};
use augur_models::{hub, write_truncated_gguf, Model};

fn model_path() -> PathBuf {
    match std::env::var_os("AUGUR_MODEL") {
        Some(p) => PathBuf::from(p),
        None => hub::ensure_default_model().expect("default model"),
    }
}

const PROMPT: &str = "<|im_start|>user\nRewrite this so every function has a docstring:\n\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n<|im_end|>\n<|im_start|>assistant\n";

fn cfg(temperature: f32) -> GenerateConfig {
    GenerateConfig {
        max_tokens: 64,
        sampler: SamplerConfig { temperature, top_k: 40, seed: 5, ..Default::default() },
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn greedy_speculative_output_equals_plain_greedy() {
    let path = model_path();
    let model = Model::open(&path).unwrap();
    let prompt = model.tokenizer.encode(PROMPT).unwrap();
    let plain = generate(&model, &prompt, &cfg(0.0), |_| ControlFlow::Continue(())).unwrap();
    let dir = std::env::temp_dir().join(format!("augur-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let draft_path = dir.join("draft-8-layers.gguf");
    write_truncated_gguf(&path, &draft_path, 8).unwrap();
    let drafters: Vec<(&str, Box<dyn Drafter>)> = vec![
        ("prompt-lookup", Box::new(PromptLookup::new(3, 1))),
        ("prompt-lookup tree", Box::new(PromptLookup::new(3, 3))),
        ("early-exit:6", Box::new(EarlyExit { layers: 6 })),
        ("draft:8 layers", Box::new(DraftModel::new(Model::open(&draft_path).unwrap(), &model).unwrap())),
    ];
    for (name, mut d) in drafters {
        let (s, stats) = speculative::generate(&model, &prompt, &cfg(0.0), &SpecConfig { throttle: false, ..SpecConfig::new(6) }, d.as_mut(), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(s.generated, plain.generated, "{name}: speculative greedy output differs from plain greedy");
        assert_eq!(s.text, plain.text);
        assert!(stats.target_passes <= plain.generated.len(), "{name}");
        eprintln!("{name}: tau {:.2}, accept by depth {:?}", stats.tau(), stats.accept_rate_by_pos());
        if name.starts_with("prompt-lookup") {
            assert!(stats.tau() > 1.2, "{name}: a repetitive prompt should accept drafts (tau {})", stats.tau());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sampled_speculation_is_reproducible_and_stops_on_budget() {
    let model = Model::open(&model_path()).unwrap();
    let prompt = model.tokenizer.encode(PROMPT).unwrap();
    let run = || {
        let mut d = PromptLookup::new(3, 2);
        speculative::generate(&model, &prompt, &cfg(0.8), &SpecConfig::new(5), &mut d, |_| ControlFlow::Continue(())).unwrap().0
    };
    let (a, b) = (run(), run());
    assert_eq!(a.generated, b.generated);
    assert_eq!(a.generated.len(), 64);
}

#[test]
fn a_draft_model_with_another_vocabulary_is_refused() {
    let dir = std::env::temp_dir().join(format!("augur-spec-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = dir.join("tiny.gguf");
    augur_models::tiny::write_gguf(&tiny, true, None, 1).unwrap();
    let target = Model::open(&model_path()).unwrap();
    let err = DraftModel::new(Model::open(&tiny).unwrap(), &target).err().unwrap().to_string();
    assert!(err.contains("vocabulary"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
