//! A tiny GPT learns a short text: the loss falls from ln(256) ≈ 5.5 to below 1.0 within 150
//! AdamW steps, in f32 and under bf16 autocast (f16 with the loss scaler too).

use augur_core::DType;
use augur_nn::amp::{autocast, GradScaler};
use augur_nn::optim::{clip_grad_norm, AdamW, LrSchedule, Optimizer};
use augur_nn::{Gpt, GptConfig, ModuleExt, Rng};

const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, \
it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was \
the season of Light, it was the season of Darkness, it was the spring of hope, it was the winter of \
despair, we had everything before us, we had nothing before us.";

fn train(precision: Option<DType>) -> (f32, f32) {
    let cfg = GptConfig { dim: 64, n_layer: 2, n_head: 4, n_kv_head: 2, hidden: 128, seed: 7, ..GptConfig::default() };
    let mut model = Gpt::new(cfg).unwrap();
    let bytes: Vec<u32> = TEXT.bytes().map(u32::from).collect();
    let (batch, seq, steps) = (8, 32, 150);
    let sched = LrSchedule { base_lr: 3e-3, min_lr: 3e-4, warmup: 10, total: steps };
    let mut opt = AdamW::new(3e-3, (0.9, 0.95), 1e-8, 0.1);
    let mut scaler = GradScaler::for_precision(precision);
    let mut rng = Rng::new(1);
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..steps {
        let (mut ids, mut tgt) = (vec![], vec![]);
        for _ in 0..batch {
            let s = rng.below(bytes.len() - seq - 1);
            ids.extend_from_slice(&bytes[s..s + seq]);
            tgt.extend_from_slice(&bytes[s + 1..s + seq + 1]);
        }
        let loss = autocast(precision, || model.loss(&ids, &tgt, batch)).unwrap().unwrap();
        scaler.scale_loss(&loss).unwrap().backward().unwrap();
        let found_inf = scaler.unscale(&mut model).unwrap();
        clip_grad_norm(&mut model, 1.0).unwrap();
        opt.set_lr(sched.at(step));
        scaler.step(&mut opt, &mut model, found_inf).unwrap();
        model.zero_grad();
        let l = loss.item().unwrap();
        if step == 0 {
            first = l;
        }
        last = l;
    }
    (first, last)
}

#[test]
fn f32_training_memorises_the_text() {
    let (first, last) = train(None);
    assert!(first > 5.0, "initial loss {first} should be near ln(256)");
    assert!(last < 1.0, "loss after training {last}");
}

#[test]
fn bf16_autocast_training_memorises_the_text() {
    let (first, last) = train(Some(DType::BF16));
    assert!(first > 5.0 && last < 1.0, "bf16: {first} -> {last}");
}

#[test]
fn f16_autocast_training_with_loss_scaling_memorises_the_text() {
    let (first, last) = train(Some(DType::F16));
    assert!(first > 5.0 && last < 1.0, "f16: {first} -> {last}");
}
