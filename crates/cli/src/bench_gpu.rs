//! `augur bench flash`: FlashAttention forward and forward+backward throughput on a CUDA device
//! over a range of sequence lengths, as JSON lines (bench/gpu/flash_peer.py is PyTorch's twin).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct FlashArgs {
    /// Sequence lengths (queries = keys); the batch is `--tokens / seq`.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192,16384")]
    pub seq: Vec<usize>,
    /// Tokens per call (batch × sequence length), FlashAttention's benchmark convention.
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// `bf16` or `f16`.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Without the causal mask.
    #[arg(long)]
    pub full: bool,
    /// Timed calls per pass (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

#[cfg(feature = "cuda")]
pub fn flash(a: FlashArgs) -> Result<()> {
    use anyhow::{bail, ensure};
    use augur_cuda::{forward_flops, Attention, Device, Dtype, Flash, FlashShape, Io};
    use serde_json::json;
    use std::time::Instant;

    let ty = match a.dtype.as_str() {
        "bf16" => Dtype::Bf16,
        "f16" => Dtype::F16,
        other => bail!("--dtype {other}: use bf16 or f16"),
    };
    ensure!(a.runs > 0, "--runs must be at least 1");
    let dev = Device::open(a.device)?;
    let flash = Flash::new(&dev)?;
    let causal = !a.full;
    for &seq in &a.seq {
        ensure!(seq > 0 && a.tokens >= seq, "--tokens {} must be at least the sequence length {seq}", a.tokens);
        let shape = FlashShape { batch: a.tokens / seq, heads: a.heads, kv_heads: a.heads, q_len: seq, k_len: seq, dim: a.head_dim };
        let mut att = Attention::new(&flash, shape, causal, ty, 1.0 / (a.head_dim as f32).sqrt())?;
        for (i, io) in [Io::Q, Io::K, Io::V, Io::DOut].into_iter().enumerate() {
            att.fill(&flash, io, 1 + i as u32)?;
        }
        // One warm-up of each pass, then the timed calls, each waited for.
        let (mut fwd, mut bwd) = (vec![], vec![]);
        for run in 0..=a.runs {
            let t = Instant::now();
            att.forward(&flash)?;
            dev.synchronize()?;
            let f = t.elapsed().as_secs_f64();
            let t = Instant::now();
            att.backward(&flash)?;
            dev.synchronize()?;
            if run > 0 {
                fwd.push(f);
                bwd.push(t.elapsed().as_secs_f64());
            }
        }
        let (f, b) = (crate::bench::median(fwd), crate::bench::median(bwd));
        let flops = forward_flops(&shape, causal);
        println!(
            "{}",
            json!({
                "bench": "flash", "engine": "augur", "device": dev.name(), "dtype": a.dtype, "causal": causal,
                "batch": shape.batch, "heads": a.heads, "seq": seq, "head_dim": a.head_dim,
                "fwd_kernel": flash.forward_kernel(a.head_dim),
                "fwd_ms": f * 1e3, "bwd_ms": b * 1e3,
                "fwd_tflops": flops / f / 1e12,
                "bwd_tflops": 2.5 * flops / b / 1e12,
                "fwd_bwd_tflops": 3.5 * flops / (f + b) / 1e12,
            })
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn flash(_: FlashArgs) -> Result<()> {
    anyhow::bail!("`augur bench flash` runs on a CUDA device: rebuild with `cargo build --release --features cuda`")
}
