//! Tiny models written by augur: the GGUF (permuted q/k, interleaved RoPE) and safetensors (HF
//! layout, rotate-half RoPE) forms of the same weights load through the one model definition and
//! give the same logits; quantized GGUF variants stay close to f32.

use augur_core::QuantType;
use augur_models::{tiny, Activations, Logits, Model, State};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("augur-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = State::new(&model.llama.cfg);
    model.llama.forward(&mut st, ids, Logits::All).unwrap().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn gguf_and_safetensors_forms_agree() {
    for tied in [true, false] {
        let dir = tmpdir(&format!("agree-{tied}"));
        let (g, s) = tiny::write_both(&dir, tied, 42).unwrap();
        let mg = Model::open(&g).unwrap();
        let ms = Model::open(&s).unwrap();
        assert_eq!(mg.llama.cfg.tied_embeddings, tied);
        let ids = mg.tokenizer.encode("hello world, 123").unwrap();
        assert_eq!(ids, ms.tokenizer.encode("hello world, 123").unwrap());
        assert_eq!(ids[0], 262, "merges apply: `hello` is one token");
        let (a, b) = (run(&mg, &ids), run(&ms, &ids));
        let d = max_diff(&a, &b);
        assert!(d < 1e-3, "tied={tied}: GGUF vs safetensors logits differ by {d}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn quantized_gguf_tracks_f32() {
    let dir = tmpdir("quant");
    let f = dir.join("f32.gguf");
    tiny::write_gguf(&f, true, None, 7).unwrap();
    let reference = run(&Model::open(&f).unwrap(), &[5, 80, 120, 7, 200]);
    let scale = reference.iter().map(|v| v.abs()).fold(0.0, f32::max);
    for q in QuantType::ALL {
        let p = dir.join(format!("{}.gguf", q.name()));
        tiny::write_gguf(&p, true, Some(q), 7).unwrap();
        let got = run(&Model::open(&p).unwrap(), &[5, 80, 120, 7, 200]);
        let rel = max_diff(&got, &reference) / scale;
        let bound = match q {
            QuantType::Q8_0 => 0.02,
            QuantType::Q6_K => 0.05,
            _ => 0.25,
        };
        assert!(rel < bound, "{}: relative logit error {rel} exceeds {bound}", q.name());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn errors_name_the_problem() {
    let dir = tmpdir("errors");
    let (g, _) = tiny::write_both(&dir, true, 1).unwrap();
    let m = Model::open(&g).unwrap();
    let mut st = State::new(&m.llama.cfg);
    let e = m.llama.forward(&mut st, &[99_999], Logits::Last).unwrap_err().to_string();
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
    let long = vec![5u32; m.llama.cfg.context + 1];
    let e = m.llama.forward(&mut st, &long, Logits::Last).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    // A truncated file names the tensor whose data is missing.
    let bytes = std::fs::read(&g).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 5000]).unwrap();
    let e = Model::open(&cut).err().unwrap().to_string();
    assert!(e.contains("truncated") && e.contains("tensor `"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn forward_many_equals_each_sequence_alone() {
    use augur_models::Activations;
    let dir = tmpdir("many");
    let p = dir.join("q.gguf");
    tiny::write_gguf(&p, false, Some(QuantType::Q4_1), 9).unwrap();
    let m = Model::open(&p).unwrap();
    let cfg = &m.llama.cfg;
    let prompts: [&[u32]; 3] = [&[5, 6, 7], &[100, 3], &[9, 9, 9, 9, 9]];
    for act in [Activations::I16, Activations::I22, Activations::F32] {
        let mut solo: Vec<State> = Vec::new();
        let mut batched: Vec<State> = Vec::new();
        for p in prompts {
            for states in [&mut solo, &mut batched] {
                let mut st = State::new(cfg);
                st.activations = act;
                m.llama.forward(&mut st, p, Logits::Last).unwrap();
                states.push(st);
            }
        }
        let mut scratch = State::new(cfg);
        scratch.activations = act;
        for step in 0..4u32 {
            let toks = [20 + step, 30 + step, 40 + step];
            let mut refs: Vec<&mut State> = batched.iter_mut().collect();
            let many = m.llama.forward_many(&mut scratch, &mut refs, &toks).unwrap().to_vec();
            for (i, st) in solo.iter_mut().enumerate() {
                let one = m.llama.forward(st, &[toks[i]], Logits::Last).unwrap();
                assert!(one == &many[i * cfg.vocab..(i + 1) * cfg.vocab], "{act:?} step {step} sequence {i} differs");
            }
        }
        for (a, b) in solo.iter().zip(&batched) {
            assert_eq!(a.len(), b.len());
            assert!(a.kv(1) == b.kv(1));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn qwen2_with_biases_agrees_between_gguf_and_safetensors() {
    let dir = tmpdir("qwen2");
    let g = dir.join("qwen2.gguf");
    tiny::write_gguf_arch(&g, "qwen2", false, None, 13).unwrap();
    let st = dir.join("qwen2-hf");
    tiny::write_safetensors_arch(&st, "qwen2", false, 13).unwrap();
    let (mg, ms) = (Model::open(&g).unwrap(), Model::open(&st).unwrap());
    assert_eq!(mg.llama.cfg.arch, "qwen2");
    assert!(!mg.llama.cfg.rope_interleaved);
    let ids = [40u32, 41, 42, 7, 8];
    let (a, b) = (run(&mg, &ids), run(&ms, &ids));
    let d = max_diff(&a, &b);
    assert!(d < 1e-3, "qwen2 GGUF vs safetensors logits differ by {d}");
    let file = augur_formats::gguf::Gguf::open(&g).unwrap();
    assert!(file.tensor_info("blk.0.attn_q.bias").is_some(), "the qwen2 file carries q/k/v biases");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_long_prompt_equals_feeding_it_token_by_token() {
    // Where the weights are packed (AVX-512 VNNI), a prompt past 16 tokens takes the integer
    // kernel in chunks of 16, whose rows do not depend on the batch: the cache and the last
    // logits equal those of feeding the prompt one token at a time, bit for bit.
    if !augur_kernels::packed::available() {
        eprintln!("skipped: this CPU has no packed kernel (AVX-512 VNNI); long prompts take the f32 gemm path");
        return;
    }
    let dir = tmpdir("long");
    for quant in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0] {
        let p = dir.join(format!("{}.gguf", quant.name()));
        tiny::write_gguf(&p, false, Some(quant), 21).unwrap();
        let m = Model::open(&p).unwrap();
        let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 250).collect();
        let mut whole = State::new(&m.llama.cfg);
        let last = m.llama.forward(&mut whole, &prompt, Logits::Last).unwrap().to_vec();
        let mut steps = State::new(&m.llama.cfg);
        let mut one = Vec::new();
        for &t in &prompt {
            one = m.llama.forward(&mut steps, &[t], Logits::Last).unwrap().to_vec();
        }
        assert!(last == one, "{}: last logits differ", quant.name());
        for l in 0..m.llama.cfg.n_layer {
            assert!(whole.kv(l) == steps.kv(l), "{}: layer {l}'s cache differs", quant.name());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn released_weight_pages_read_back_the_same() {
    // A mapped weight whose pages were handed back still reads its bytes (from the file).
    let dir = tmpdir("release");
    let p = dir.join("q.gguf");
    tiny::write_gguf(&p, false, Some(QuantType::Q4_1), 5).unwrap();
    let g = augur_formats::gguf::Gguf::open(&p).unwrap();
    let t = g.tensor("blk.0.ffn_up.weight").unwrap();
    let before = t.storage().raw().unwrap().to_vec();
    t.release_pages();
    assert_eq!(t.storage().raw().unwrap(), &before[..]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_kv_cache_follows_the_activations_and_converts_when_they_change() {
    // The 16-bit path keeps 16-bit rows with a scale per (position, KV head); f32 and 22-bit
    // activations keep f32. Switching mid-sequence converts what is cached: f32 rows come back
    // within a 16-bit step of their row's largest value, and 16-bit rows widen exactly.
    let dir = tmpdir("kvformat");
    let p = dir.join("q8.gguf");
    tiny::write_gguf(&p, false, Some(QuantType::Q8_0), 5).unwrap();
    let m = Model::open(&p).unwrap();
    let (cfg, hd) = (&m.llama.cfg, m.llama.cfg.head_dim);
    let mut st = State::new(cfg);
    st.activations = Activations::F32;
    m.llama.forward(&mut st, &[3, 1, 4, 1, 5, 9, 2, 6], Logits::Last).unwrap();
    let f32_rows = st.kv(0);
    st.activations = Activations::I16;
    let next = m.llama.forward(&mut st, &[5], Logits::Last).unwrap().to_vec();
    let int_rows = st.kv(0);
    assert_eq!(int_rows.0.len(), f32_rows.0.len() + cfg.n_kv_head * hd);
    for (was, now) in [(&f32_rows.0, &int_rows.0), (&f32_rows.1, &int_rows.1)] {
        for (a, b) in was.chunks_exact(hd).zip(now.chunks_exact(hd)) {
            let top = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = top / 32767.0;
            // Half a step, and the f32 roundings of scaling and widening.
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 0.5 * step + 4.0 * f32::EPSILON * top, "a row moved by {worst}, more than half a step ({step})");
            assert!(a != b || step == 0.0 || a.iter().all(|x| (x / step).fract() == 0.0), "the rows were not converted");
        }
    }
    st.activations = Activations::F32;
    st.truncate(st.len() - 1);
    let again = m.llama.forward(&mut st, &[5], Logits::Last).unwrap().to_vec();
    let (k, v) = st.kv(0);
    let n = f32_rows.0.len();
    assert!(k[..n] == int_rows.0[..n] && v[..n] == int_rows.1[..n], "16-bit rows must widen exactly");
    assert!(max_diff(&next, &again) < 1e-2, "the same step on either path");
    std::fs::remove_dir_all(&dir).ok();
}
