//! On the real default model (`AUGUR_MODEL`, else skipped): the draft built from the target's
//! first blocks computes what the truncated GGUF of the same blocks computes.

use augur_distill::draft;
use augur_models::{write_truncated_gguf, Activations, Logits, Model, State};

#[test]
fn draft_from_the_real_target_equals_its_truncation() {
    let Some(path) = std::env::var_os("AUGUR_MODEL") else {
        eprintln!("skipped: set AUGUR_MODEL to a local copy of the default model");
        return;
    };
    let model = Model::open(std::path::Path::new(&path)).unwrap();
    let ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog because").unwrap();
    let gpt = draft::from_target(&model, 2).unwrap();
    let got = augur_core::no_grad(|| gpt.forward(&ids, 1, None)).unwrap().to_vec_f32().unwrap();
    let out = std::env::temp_dir().join(format!("augur-draft-real-{}.gguf", std::process::id()));
    write_truncated_gguf(&model.path, &out, 2).unwrap();
    let t = Model::open(&out).unwrap();
    let mut st = State::new(&t.llama.cfg);
    st.activations = Activations::F32;
    let want = t.llama.forward(&mut st, &ids, Logits::All).unwrap().to_vec();
    std::fs::remove_file(&out).ok();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("draft vs truncated target: max diff {diff} (scale {scale})");
    assert!(diff < 1e-3 * scale, "draft vs truncated target: max diff {diff} (scale {scale})");
}
