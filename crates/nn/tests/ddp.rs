//! Data parallelism: 2 ranks with batch B each end with the parameters of 1 rank with batch 2B,
//! and the ranks hold identical parameters after every step.

use augur_nn::dist::{Ddp, ProcessGroup, ThreadGroup};
use augur_nn::train::{Corpus, TrainSettings, Trainer};
use augur_nn::{GptConfig, ModuleExt};

fn checksum(t: &mut Trainer) -> Vec<Vec<f32>> {
    t.model.named_parameters().iter().map(|(_, p)| p.to_vec_f32().unwrap()).collect()
}

#[test]
fn two_ranks_equal_one_rank_with_twice_the_batch() {
    let cfg = GptConfig { dim: 32, n_layer: 2, n_head: 4, n_kv_head: 2, hidden: 64, seed: 5, ..GptConfig::default() };
    let text = "data parallel training splits every batch between ranks. ".repeat(30);
    let corpus = Corpus::split(text.bytes().map(u32::from).collect(), 0.1).unwrap();
    let settings = |batch| TrainSettings { batch, seq_len: 16, steps: 4, warmup: 1, lr: 3e-3, ..TrainSettings::default() };
    let mut single = Trainer::new(cfg.clone(), settings(4)).unwrap();
    for _ in 0..4 {
        single.step(&corpus).unwrap();
    }
    let want = checksum(&mut single);
    let groups = ThreadGroup::new(2);
    let results: Vec<Vec<Vec<Vec<f32>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| {
                let (cfg, corpus) = (cfg.clone(), corpus.clone());
                s.spawn(move || {
                    // Different initial seeds: the broadcast must make them equal.
                    let mut t = Trainer::new(GptConfig { seed: 5 + g.rank() as u64 * 100, ..cfg }, settings(2)).unwrap();
                    if g.rank() == 0 {
                        t.model = augur_nn::Gpt::new(GptConfig { seed: 5, ..t.model.config.clone() }).unwrap();
                    }
                    Ddp::new(g).broadcast_parameters(&mut t.model).unwrap();
                    let mut per_step = vec![];
                    for _ in 0..4 {
                        t.step_parallel(&corpus, g).unwrap();
                        per_step.push(checksum(&mut t).concat());
                    }
                    per_step.push(checksum(&mut t).into_iter().flatten().collect());
                    per_step.into_iter().map(|v| vec![v]).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Identical on both ranks after every step.
    assert_eq!(results[0], results[1], "ranks diverged");
    let got: Vec<f32> = results[0].last().unwrap()[0].clone();
    let want: Vec<f32> = want.into_iter().flatten().collect();
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "parameter element {i}: 2 ranks {a} vs 1 rank {b}");
    }
}
