//! Generation with the argmax on a CUDA device (`GenerateConfig::ids_only`) against the CPU's
//! step-by-step greedy decoding, on an augur-written tiny model: the same ids and text, the same
//! stops, and a session's next turn reusing the device's cache. Without a device (or without the
//! `cuda` feature) they skip, saying so.
#![cfg(feature = "cuda")]

use std::ops::ControlFlow;

use augur_core::QuantType;
use augur_decode::{generate, generate_in, GenerateConfig, Session, StopReason};
use augur_models::{tiny, Activations, Model};

fn open(name: &str) -> Option<(Model, Model)> {
    let cfg = tiny::config_arch("llama", true);
    let path = std::env::temp_dir().join(format!("augur-decode-device-{name}-{}.gguf", std::process::id()));
    tiny::write_gguf_config(&path, &cfg, Some(QuantType::Q4_1), Some(QuantType::Q4_1), 7).unwrap();
    let pair = tiny::open_on_host_and_device(&path).unwrap();
    std::fs::remove_file(&path).ok();
    pair
}

const PROMPT: [u32; 11] = [262, 40, 41, 42, 100, 7, 8, 9, 262, 13, 200];

fn cfg(max_tokens: usize, ids_only: bool) -> GenerateConfig {
    // The CPU side decodes with f32 activations, the device's arithmetic.
    GenerateConfig { max_tokens, ignore_eos: true, activations: Activations::F32, ids_only, ..Default::default() }
}

#[test]
fn device_greedy_equals_the_cpu_and_hands_out_ids_only() {
    let Some((cpu, gpu)) = open("greedy") else { return };
    let want = generate(&cpu, &PROMPT, &cfg(40, true), |_| ControlFlow::Continue(())).unwrap();
    let mut logits_seen = 0;
    let got = generate(&gpu, &PROMPT, &cfg(40, true), |ev| {
        logits_seen += ev.logits.len();
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got.generated, want.generated);
    assert_eq!(got.text, want.text);
    assert_eq!(got.stop, StopReason::MaxTokens);
    assert_eq!(logits_seen, 0, "the argmax stayed on the device");
    // Without ids_only the logits come to the host, and the ids are the same.
    let host = generate(&gpu, &PROMPT, &cfg(40, false), |ev| {
        assert_eq!(ev.logits.len(), gpu.llama.cfg.vocab);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(host.generated, want.generated);
    // The callback stops after its fifth token: exactly those five.
    let mut n = 0;
    let stopped = generate(&gpu, &PROMPT, &cfg(40, true), |_| {
        n += 1;
        if n == 5 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })
    .unwrap();
    assert_eq!(stopped.generated, want.generated[..5]);
    assert_eq!(stopped.stop, StopReason::Callback);
    // A token past the vocabulary is refused before anything reaches the device.
    let vocab = gpu.llama.cfg.vocab as u32;
    let e = generate(&gpu, &[5, vocab], &cfg(4, true), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(e.to_string().contains(&vocab.to_string()), "{e}");
}

#[test]
fn a_device_session_reuses_its_cache_across_turns() {
    let Some((cpu, gpu)) = open("session") else { return };
    let (mut a, mut b) = (Session::new(&cpu), Session::new(&gpu));
    let go = |_: &augur_decode::TokenEvent| ControlFlow::Continue(());
    let first = generate_in(&mut a, &cpu, &PROMPT, &cfg(12, true), go).unwrap();
    let got = generate_in(&mut b, &gpu, &PROMPT, &cfg(12, true), go).unwrap();
    assert_eq!(got.generated, first.generated);
    // The next turn: the conversation so far, then new tokens.
    let mut next: Vec<u32> = PROMPT.to_vec();
    next.extend_from_slice(&first.generated);
    next.extend_from_slice(&[30, 31, 17]);
    let want = generate_in(&mut a, &cpu, &next, &cfg(20, true), go).unwrap();
    let got = generate_in(&mut b, &gpu, &next, &cfg(20, true), go).unwrap();
    assert_eq!(got.generated, want.generated);
    assert_eq!(got.cached_tokens, PROMPT.len() + first.generated.len() - 1, "the earlier turn's rows were kept");
    assert_eq!(got.cached_tokens, want.cached_tokens);
}
