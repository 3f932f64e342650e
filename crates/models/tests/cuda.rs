//! The CUDA backend against the CPU backend on augur-written tiny models: every pass kind
//! (prefill, decode, tree verification with keep, early exit, hidden states) and the
//! graph-replayed greedy decode. Without a device (or without the `cuda` feature) they skip,
//! saying so.
#![cfg(feature = "cuda")]

use augur_core::QuantType;
use augur_cuda::Decoder;
use augur_models::{tiny, Activations, Logits, Model, State};

fn open(arch: &str, tied: bool, quant: Option<QuantType>) -> Option<(Model, Model)> {
    open_config(&tiny::config_arch(arch, tied), quant, quant)
}

fn open_config(cfg: &augur_models::Config, quant: Option<QuantType>, embed: Option<QuantType>) -> Option<(Model, Model)> {
    let name = format!("augur-cuda-{}-{}-{}-{quant:?}-{embed:?}-{}.gguf", cfg.arch, cfg.tied_embeddings, cfg.context, std::process::id());
    let path = std::env::temp_dir().join(name);
    tiny::write_gguf_config(&path, cfg, quant, embed, 7).unwrap();
    let pair = tiny::open_on_host_and_device(&path).unwrap();
    std::fs::remove_file(&path).ok();
    pair
}

fn cpu_state(m: &Model) -> State {
    let mut st = State::new(&m.llama.cfg);
    st.activations = Activations::F32;
    st
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

const PROMPT: [u32; 11] = [262, 40, 41, 42, 100, 7, 8, 9, 262, 13, 200];

#[test]
fn prefill_and_decode_match_the_cpu() {
    for (arch, tied, quant) in [("llama", true, Some(QuantType::Q4_1)), ("llama", false, Some(QuantType::Q6_K)), ("qwen2", false, None), ("llama", true, Some(QuantType::Q8_0))] {
        let Some((cpu, gpu)) = open(arch, tied, quant) else { return };
        let (mut a, mut b) = (cpu_state(&cpu), State::new(&gpu.llama.cfg));
        let want = cpu.llama.forward(&mut a, &PROMPT, Logits::All).unwrap().to_vec();
        let got = gpu.llama.forward(&mut b, &PROMPT, Logits::All).unwrap().to_vec();
        let e = max_rel(&got, &want);
        assert!(e < 1e-4, "{arch} tied={tied} {quant:?}: prefill logits differ by {e}");
        assert!(max_rel(b.hidden(), a.hidden()) < 1e-4, "hidden states");
        for tok in [5u32, 260, 17] {
            let want = cpu.llama.forward(&mut a, &[tok], Logits::Last).unwrap().to_vec();
            let got = gpu.llama.forward(&mut b, &[tok], Logits::Last).unwrap().to_vec();
            assert!(max_rel(&got, &want) < 1e-4, "{arch}: decode logits");
        }
        // Rolled back and recomputed: the cache rows are overwritten.
        a.truncate(4);
        b.truncate(4);
        let want = cpu.llama.forward(&mut a, &PROMPT[..6], Logits::Last).unwrap().to_vec();
        let got = gpu.llama.forward(&mut b, &PROMPT[..6], Logits::Last).unwrap().to_vec();
        assert!(max_rel(&got, &want) < 1e-4, "{arch}: after truncate");
    }
}

#[test]
fn tree_pass_keep_and_early_exit_match_the_cpu() {
    let Some((cpu, gpu)) = open("llama", false, Some(QuantType::Q4_0)) else { return };
    let (mut a, mut b) = (cpu_state(&cpu), State::new(&gpu.llama.cfg));
    cpu.llama.forward(&mut a, &PROMPT, Logits::Last).unwrap();
    gpu.llama.forward(&mut b, &PROMPT, Logits::Last).unwrap();
    // Root 0 with children 1, 2; node 3 under 1; node 4 under 3.
    let parent = [usize::MAX, 0, 0, 1, 3];
    let n = parent.len();
    let mut depth = vec![0; n];
    let mut anc = vec![false; n * n];
    for i in 0..n {
        let mut j = i;
        loop {
            anc[i * n + j] = true;
            if parent[j] == usize::MAX {
                break;
            }
            depth[i] += 1;
            j = parent[j];
        }
    }
    let toks = [10u32, 20, 30, 40, 50];
    let want = cpu.llama.forward_tree(&mut a, &toks, &depth, &anc).unwrap().to_vec();
    let got = gpu.llama.forward_tree(&mut b, &toks, &depth, &anc).unwrap().to_vec();
    assert!(max_rel(&got, &want) < 1e-4, "tree logits");
    let base = PROMPT.len();
    a.keep(base, &[0, 1, 3]);
    b.keep(base, &[0, 1, 3]);
    let want = cpu.llama.forward(&mut a, &[60], Logits::Last).unwrap().to_vec();
    let got = gpu.llama.forward(&mut b, &[60], Logits::Last).unwrap().to_vec();
    assert!(max_rel(&got, &want) < 1e-4, "after keeping the accepted path");
    let want = cpu.llama.forward_early_exit(&mut a, &[61], 1).unwrap().to_vec();
    let got = gpu.llama.forward_early_exit(&mut b, &[61], 1).unwrap().to_vec();
    assert!(max_rel(&got, &want) < 1e-4, "early exit");
    let mut h = State::new(&gpu.llama.cfg);
    gpu.llama.forward(&mut h, &PROMPT, Logits::Hidden).unwrap();
    let mut hc = cpu_state(&cpu);
    cpu.llama.forward(&mut hc, &PROMPT, Logits::Hidden).unwrap();
    assert!(max_rel(h.hidden(), hc.hidden()) < 1e-4, "Logits::Hidden");
}

/// The CPU's greedy continuation of `prompt` (first maximum on ties, as the device's argmax).
fn cpu_greedy(cpu: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut st = cpu_state(cpu);
    let mut logits = cpu.llama.forward(&mut st, prompt, Logits::Last).unwrap().to_vec();
    let mut want = Vec::new();
    for _ in 0..n {
        let next = logits.iter().enumerate().fold(0, |b, (i, &v)| if v > logits[b] { i } else { b }) as u32;
        want.push(next);
        logits = cpu.llama.forward(&mut st, &[next], Logits::Last).unwrap().to_vec();
    }
    want
}

#[test]
fn graph_and_persistent_greedy_equal_the_cpu_greedy() {
    let Some((cpu, gpu)) = open("llama", true, Some(QuantType::Q4_1)) else { return };
    let g = gpu.llama.gpu().unwrap();
    assert_eq!(g.decoder(), Decoder::Persistent, "the default decoder for a model that fits it");
    let want = cpu_greedy(&cpu, &PROMPT, 40);
    for decoder in [Decoder::Graph, Decoder::Persistent] {
        let mut seq = g.new_seq().unwrap();
        let run = g.greedy_with(decoder, &mut seq, 0, &PROMPT, 40, |_| true).unwrap();
        assert_eq!(run.tokens, want, "{decoder:?}");
        // Again on the same sequence (a new capture or block table is not needed) and on a
        // fresh one: the same ids.
        assert_eq!(g.greedy_with(decoder, &mut seq, 0, &PROMPT, 40, |_| true).unwrap().tokens, want, "{decoder:?} again");
        let mut fresh = g.new_seq().unwrap();
        assert_eq!(g.greedy_with(decoder, &mut fresh, 0, &PROMPT, 40, |_| true).unwrap().tokens, want, "{decoder:?} fresh");
        // A stop after 5 tokens returns exactly those.
        let mut seen = 0;
        let run = g.greedy_with(decoder, &mut fresh, 0, &PROMPT, 40, |_| { seen += 1; seen < 5 }).unwrap();
        assert_eq!(run.tokens, want[..5], "{decoder:?} stopped");
    }
}

#[test]
fn persistent_greedy_handles_biases_mixed_types_and_split_attention() {
    // Qwen2 (q/k/v biases, rotate-half RoPE), an untied Q8_0 head over Q4_K blocks, and a
    // context long enough that attention runs in several key splits (256 keys each).
    let mut cfg = tiny::config_arch("qwen2", false);
    cfg.context = 1024;
    let Some((cpu, gpu)) = open_config(&cfg, Some(QuantType::Q4_K), Some(QuantType::Q8_0)) else { return };
    let g = gpu.llama.gpu().unwrap();
    let prompt: Vec<u32> = (0..600).map(|i| ((i * 37 + 11) % 260) as u32).collect();
    let want = cpu_greedy(&cpu, &prompt, 24);
    let mut seq = g.new_seq().unwrap();
    assert_eq!(g.greedy_with(Decoder::Persistent, &mut seq, 0, &prompt, 24, |_| true).unwrap().tokens, want);
    let mut seq = g.new_seq().unwrap();
    assert_eq!(g.greedy_with(Decoder::Graph, &mut seq, 0, &prompt, 24, |_| true).unwrap().tokens, want);
}

#[test]
fn persistent_greedy_covers_every_attention_path() {
    // Head size 32 takes the one-round-trip attention (64 is covered by the tests above), 128
    // the generic one; 300 cached keys make ten partials per head for the merge.
    for (head_dim, n_head) in [(32, 8), (128, 2)] {
        let mut cfg = tiny::config_arch("llama", true);
        cfg.head_dim = head_dim;
        cfg.n_head = n_head;
        cfg.n_kv_head = n_head / 2;
        cfg.context = 512;
        let Some((cpu, gpu)) = open_config(&cfg, Some(QuantType::Q4_1), Some(QuantType::Q4_1)) else { return };
        let g = gpu.llama.gpu().unwrap();
        let prompt: Vec<u32> = (0..300).map(|i| ((i * 53 + 5) % 260) as u32).collect();
        let want = cpu_greedy(&cpu, &prompt, 16);
        let mut seq = g.new_seq().unwrap();
        assert_eq!(g.greedy_with(Decoder::Persistent, &mut seq, 0, &prompt, 16, |_| true).unwrap().tokens, want, "head_dim {head_dim}");
    }
}

#[test]
fn a_host_state_is_refused_on_the_device() {
    let Some((cpu, gpu)) = open("llama", true, None) else { return };
    let mut st = cpu_state(&cpu);
    cpu.llama.forward(&mut st, &PROMPT, Logits::Last).unwrap();
    let e = gpu.llama.forward(&mut st, &[5], Logits::Last).unwrap_err().to_string();
    assert!(e.contains("start a new State"), "{e}");
}

#[test]
fn several_sequences_step_together_as_on_the_cpu() {
    let Some((cpu, gpu)) = open("llama", false, Some(QuantType::Q8_0)) else { return };
    let prompts: [&[u32]; 3] = [&PROMPT[..3], &PROMPT[..7], &PROMPT];
    let (mut cs, mut gs): (Vec<State>, Vec<State>) = (Vec::new(), Vec::new());
    for p in prompts {
        let (mut a, mut b) = (cpu_state(&cpu), State::new(&gpu.llama.cfg));
        cpu.llama.forward(&mut a, p, Logits::Last).unwrap();
        gpu.llama.forward(&mut b, p, Logits::Last).unwrap();
        cs.push(a);
        gs.push(b);
    }
    let toks = [9u32, 70, 200];
    let mut sc = cpu_state(&cpu);
    let want = cpu.llama.forward_many(&mut sc, &mut cs.iter_mut().collect::<Vec<_>>(), &toks).unwrap().to_vec();
    let mut sg = State::new(&gpu.llama.cfg);
    let got = gpu.llama.forward_many(&mut sg, &mut gs.iter_mut().collect::<Vec<_>>(), &toks).unwrap().to_vec();
    assert!(max_rel(&got, &want) < 1e-4, "forward_many on the device");
    assert!(gs.iter().zip(prompts).all(|(s, p)| s.len() == p.len() + 1));
}
