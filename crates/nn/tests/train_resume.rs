//! An interrupted run that resumes from its checkpoint ends with exactly the parameters of an
//! uninterrupted one (same optimizer state, data position and RNG).

use augur_nn::posenc::PosKind;
use augur_nn::train::{load_model, Corpus, TrainSettings, Trainer};
use augur_nn::{GptConfig, ModuleExt};

fn setup() -> (GptConfig, TrainSettings, Corpus) {
    let cfg = GptConfig { dim: 32, n_layer: 2, n_head: 4, n_kv_head: 2, hidden: 64, pos: PosKind::Alibi, seed: 11, ..GptConfig::default() };
    let settings = TrainSettings { batch: 4, seq_len: 16, steps: 8, warmup: 2, lr: 3e-3, eval_windows: 4, ..TrainSettings::default() };
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    (cfg, settings, Corpus::split(text.bytes().map(u32::from).collect(), 0.1).unwrap())
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let (cfg, settings, corpus) = setup();
    let mut straight = Trainer::new(cfg.clone(), settings.clone()).unwrap();
    for _ in 0..8 {
        straight.step(&corpus).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("augur-resume-{}", std::process::id()));
    let mut first = Trainer::new(cfg, settings).unwrap();
    for _ in 0..4 {
        first.step(&corpus).unwrap();
    }
    first.save(&dir).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&dir, None).unwrap();
    assert_eq!(resumed.step, 4);
    for _ in 0..4 {
        resumed.step(&corpus).unwrap();
    }
    let (a, b) = (straight.model.named_parameters(), resumed.model.named_parameters());
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.to_vec_f32().unwrap(), y.to_vec_f32().unwrap(), "{n} differs after resuming");
    }
    // No partial files are left behind, and the checkpoint loads for inference.
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
    let m = load_model(&dir).unwrap();
    assert!(m.forward(&[1, 2, 3], 1, None).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn training_lowers_held_out_loss() {
    let (cfg, settings, corpus) = setup();
    let mut t = Trainer::new(cfg, TrainSettings { steps: 40, ..settings }).unwrap();
    let before = t.evaluate(&corpus, 16).unwrap();
    for _ in 0..40 {
        t.step(&corpus).unwrap();
    }
    let after = t.evaluate(&corpus, 16).unwrap();
    assert!(after < before * 0.7, "held-out loss {before} -> {after}");
}
