//! `Ddp` over an NCCL group with the model on the GPU: gradients are flattened into buckets on
//! the device, averaged by NCCL on its own stream while the backward pass continues, and handed
//! back as views of the reduced buckets. With one rank the mean is the identity, so the gradients
//! and the AdamW step after them must equal plain `backward`'s, up to the last bits that the
//! device's atomic accumulations (embedding scatter-add, attention's dq) vary in between runs.
//! Skips without a GPU or NCCL, saying so (CUDA builds: `cargo test -p augur-dist --features cuda`).
#![cfg(feature = "cuda")]

use augur_cuda::{Nccl, Place};
use augur_dist::nccl_group::NcclGroup;
use augur_dist::{Ddp, ProcessGroup};
use augur_nn::optim::{AdamW, Optimizer};
use augur_nn::{Gpt, GptConfig, ModuleExt};

fn grads(m: &mut Gpt) -> Vec<Vec<f32>> {
    m.named_parameters().iter().map(|(_, p)| p.grad().map_or_else(Vec::new, |g| g.to_vec_f32().unwrap())).collect()
}

fn params(m: &mut Gpt) -> Vec<Vec<f32>> {
    m.named_parameters().iter().map(|(_, p)| p.to_vec_f32().unwrap()).collect()
}

#[test]
fn device_buckets_leave_the_gradients_of_plain_backward() {
    let dev = match augur_cuda::train::backend(0) {
        Ok(d) => d,
        Err(e) => return eprintln!("skipped: no CUDA device for training ({e})"),
    };
    let id_file = std::env::temp_dir().join(format!("augur-nccl-device-test-{}", std::process::id()));
    let group = match Nccl::join(&Place { rank: 0, world: 1, id_file: id_file.clone() }) {
        Ok(n) => NcclGroup(n),
        Err(e) => return eprintln!("skipped: NCCL did not start ({e})"),
    };
    std::fs::remove_file(&id_file).ok();
    assert!(group.device_collectives().is_some());
    let cfg = GptConfig { dim: 64, n_layer: 2, n_head: 4, n_kv_head: 2, hidden: 128, vocab: 96, seed: 3, ..GptConfig::default() };
    let (batch, seq) = (3, 20);
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % 96) as u32).collect();
    let tgt: Vec<u32> = (0..batch * seq).map(|i| (i * 11 % 96) as u32).collect();
    let run = |ddp: Option<&Ddp>| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut m = Gpt::new(cfg.clone()).unwrap();
        m.to_device(Some(&dev)).unwrap();
        // A large epsilon keeps the first step smooth in the gradient: with 1e-8 it is lr·sign(g),
        // and a gradient element near zero could flip sign with the device's atomic noise.
        let mut opt = AdamW::new(1e-2, (0.9, 0.95), 0.1, 0.1);
        let loss = m.loss(&ids, &tgt, batch).unwrap();
        match ddp {
            Some(d) => d.backward(&loss, &mut m).unwrap(),
            None => loss.backward().unwrap(),
        }
        let g = grads(&mut m);
        opt.step(&mut m).unwrap();
        (g, params(&mut m))
    };
    let (want_g, want_p) = run(None);
    // Buckets of 16 KiB: many buckets, parameters of one bucket at many offsets.
    let ddp = Ddp { group: &group, bucket_bytes: 16 << 10 };
    let (got_g, got_p) = run(Some(&ddp));
    assert_eq!(got_g.len(), want_g.len());
    for (i, (a, b)) in got_g.iter().zip(&want_g).enumerate() {
        assert!(!b.is_empty(), "parameter {i} has no gradient");
        close(a, b, 1e-5, &format!("gradient of parameter {i}"));
    }
    for (i, (a, b)) in got_p.iter().zip(&want_p).enumerate() {
        close(a, b, 1e-5, &format!("parameter {i} after AdamW on bucket views"));
    }
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (j, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale.max(1e-6), "{what}, element {j}: {a} vs {b} (largest magnitude {scale})");
    }
}
