//! `--nproc N`: run N ranks of this very command for the NCCL backend, one GPU each, the way
//! `torchrun` does: the same arguments, with `AUGUR_RANK`, `AUGUR_WORLD` and `AUGUR_NCCL_ID` (the
//! file through which rank 0 hands out NCCL's id) in each rank's environment.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The arguments of this process without `--nproc N` / `--nproc=N`.
fn rank_args(args: &[String]) -> Vec<String> {
    let mut out = vec![];
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == "--nproc" {
            skip = true;
        } else if !a.starts_with("--nproc=") {
            out.push(a.clone());
        }
    }
    out
}

/// Start `n` ranks of this command and wait for all of them. When one fails, the others are
/// stopped (they would wait for it forever in their next collective) and the error names it.
pub fn spawn_ranks(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--nproc must be at least 1");
    }
    let exe = std::env::current_exe().context("finding this program to start its ranks")?;
    let args = rank_args(&std::env::args().skip(1).collect::<Vec<_>>());
    let id = std::env::temp_dir().join(format!("augur-nccl-id-{}", std::process::id()));
    let _ = std::fs::remove_file(&id);
    let mut ranks: Vec<(usize, Child)> = vec![];
    for r in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env("AUGUR_RANK", r.to_string())
            .env("AUGUR_WORLD", n.to_string())
            .env("AUGUR_NCCL_ID", &id)
            // NVLink multicast can take shared GPUs out of service: never let NCCL use it.
            .env("NCCL_NVLS_ENABLE", "0")
            .spawn()
            .with_context(|| format!("starting rank {r}"))?;
        ranks.push((r, child));
    }
    let mut failed = None;
    while !ranks.is_empty() {
        let mut i = 0;
        while i < ranks.len() {
            match ranks[i].1.try_wait()? {
                Some(status) => {
                    let (r, _) = ranks.swap_remove(i);
                    if !status.success() && failed.is_none() {
                        failed = Some((r, status));
                    }
                }
                None => i += 1,
            }
        }
        if failed.is_some() {
            for (_, c) in &mut ranks {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&id);
    if let Some((r, status)) = failed {
        bail!("rank {r} of {n} failed ({status}); the other ranks were stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_run_the_same_command_without_nproc() {
        let a: Vec<String> = ["train", "--ddp", "nccl", "--nproc", "2", "--steps", "5", "--nproc=3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(rank_args(&a), ["train", "--ddp", "nccl", "--steps", "5"]);
    }
}
