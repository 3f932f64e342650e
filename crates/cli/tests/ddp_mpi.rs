//! `mpirun -np 2 augur train --ddp` with batch B per rank ends with the parameters of one process
//! with batch 2B (MPI builds only: `cargo test -p augur-cli --features mpi --test ddp_mpi`).
#![cfg(feature = "mpi")]

use std::process::Command;

fn params(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let ck = augur_formats::safetensors::Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let mut names: Vec<String> = ck.names().map(String::from).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), ck.get(&n).unwrap().to_vec_f32().unwrap())).collect()
}

#[test]
fn two_mpi_ranks_equal_one_process_with_twice_the_batch() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        panic!("mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
    }
    let dir = std::env::temp_dir().join(format!("augur-ddp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("text.txt");
    std::fs::write(&data, "ranks share the work of every batch. ".repeat(300)).unwrap();
    let bin = env!("CARGO_BIN_EXE_augur");
    let args = |batch: &str, out: &str| -> Vec<String> {
        ["train", "--data", data.to_str().unwrap(), "--config", "tiny", "--seq-len", "16", "--steps", "4", "--eval-every", "4", "--threads", "1", "--batch", batch, "--out", dir.join(out).to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let one = Command::new(bin).args(args("4", "one")).output().unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    // `--ddp` belongs to the train subcommand: put it after `train`.
    let mut two_args = args("2", "two");
    two_args.insert(1, "--ddp".into());
    let two = Command::new("mpirun").args(["--allow-run-as-root", "--oversubscribe", "-np", "2", bin]).args(&two_args).output().unwrap();
    assert!(two.status.success(), "{}", String::from_utf8_lossy(&two.stderr));
    assert!(String::from_utf8_lossy(&two.stderr).contains("over 2 rank(s)"));
    for ((n, a), (_, b)) in params(&dir.join("one")).iter().zip(params(&dir.join("two"))) {
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{n}: 1 process {x} vs 2 ranks {y}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
