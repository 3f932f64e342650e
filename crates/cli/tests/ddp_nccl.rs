//! `augur train --ddp nccl --nproc N` with batch B per rank ends with the parameters of one
//! process with batch N·B: one rank on a one-GPU machine, two where there are two GPUs, with the
//! model on the host (gradients staged through the GPU) and on the GPUs (gradients reduced in
//! device memory). CUDA builds: `cargo test -p augur-cli --features cuda --test ddp_nccl`.
//! Without the GPUs or NCCL the cases skip, saying why. `AUGUR_BIN` overrides the augur binary
//! (for runs on a GPU machine where the build directory is not present).
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

fn params(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = augur_formats::safetensors::Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let mut names: Vec<String> = ck.names().map(String::from).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), ck.get(&n).unwrap().to_vec_f32().unwrap())).collect()
}

fn gpus() -> usize {
    Command::new("nvidia-smi").arg("-L").output().map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("GPU ")).count())
}

fn bin() -> PathBuf {
    std::env::var_os("AUGUR_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_augur")), PathBuf::from)
}

/// `device`: where the model trains. `tol`: relative tolerance of the final parameters (the GPU's
/// products reduce in an order that depends on the batch).
fn ranks_equal_one_process(ranks: usize, device: &str, tol: f32) {
    if gpus() < ranks {
        eprintln!("skipped: {ranks} NCCL rank(s) need {ranks} GPU(s); nvidia-smi lists {}", gpus());
        return;
    }
    let dir = std::env::temp_dir().join(format!("augur-nccl-{ranks}-{device}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("text.txt");
    std::fs::write(&data, "ranks share the work of every batch. ".repeat(300)).unwrap();
    let args = |batch: usize, out: &str| -> Vec<String> {
        let s = ["train", "--data", data.to_str().unwrap(), "--config", "tiny", "--seq-len", "16", "--steps", "4", "--eval-every", "4", "--threads", "1"];
        let mut v: Vec<String> = s.iter().map(|s| s.to_string()).collect();
        v.extend(["--batch".into(), batch.to_string(), "--device".into(), device.into(), "--out".into(), dir.join(out).to_string_lossy().into_owned()]);
        v
    };
    let one = Command::new(bin()).args(args(2 * ranks, "one")).output().unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let mut many = args(2, "many");
    many.extend(["--ddp".into(), "nccl".into(), "--nproc".into(), ranks.to_string()]);
    let out = Command::new(bin()).args(&many).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("libnccl.so.2 could not be loaded") {
        eprintln!("skipped: NCCL is not installed here ({err})");
        return;
    }
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("over {ranks} rank(s)")), "{err}");
    let mut worst = 0f32;
    for ((n, a), (_, b)) in params(&dir.join("one")).iter().zip(params(&dir.join("many"))) {
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / (1.0 + y.abs()));
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{n}: 1 process {x} vs {ranks} NCCL rank(s) {y} on {device}");
        }
    }
    eprintln!("{ranks} rank(s) on {device}: largest relative difference from one process {worst:.2e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn one_nccl_rank_equals_one_process() {
    ranks_equal_one_process(1, "cpu", 1e-5);
}

#[test]
fn two_nccl_ranks_equal_one_process_with_twice_the_batch() {
    ranks_equal_one_process(2, "cpu", 1e-5);
}

#[test]
fn one_nccl_rank_on_the_gpu_equals_one_process() {
    ranks_equal_one_process(1, "cuda", 1e-4);
}

#[test]
fn two_nccl_ranks_on_the_gpus_equal_one_process_with_twice_the_batch() {
    ranks_equal_one_process(2, "cuda", 1e-4);
}
