//! `augur experiment pos-extrapolation`: the positional-encoding study. The same small GPT is
//! trained with each encoding on the same data and budget at length L, then evaluated at L, 2L,
//! 4L and 8L (RoPE also with NTK-aware and YaRN scaling, without retraining).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use augur_nn::posenc::{PosKind, RopeScaling};
use augur_nn::train::{Corpus, TrainSettings, Trainer};
use augur_nn::GptConfig;
use serde_json::json;

use crate::bench_train::set_train_threads;
use crate::train::{default_corpus, read_text};

#[derive(clap::Subcommand, Debug)]
pub enum Experiment {
    /// Perplexity against evaluation length for every positional encoding.
    PosExtrapolation(PosArgs),
}

#[derive(clap::Args, Debug)]
pub struct PosArgs {
    /// Text to train and evaluate on (default: the Python standard library's source).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Training length L.
    #[arg(long, default_value_t = 64)]
    pub train_len: usize,
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Held-out windows per evaluation.
    #[arg(long, default_value_t = 24)]
    pub eval_windows: usize,
    /// Where the table (results.md), the plot (perplexity.svg) and results.json go.
    #[arg(long, default_value = "pos-extrapolation")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2 << 20)]
    pub max_bytes: usize,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

pub fn main(e: Experiment) -> Result<()> {
    let Experiment::PosExtrapolation(a) = e;
    set_train_threads(a.threads)?;
    let (paths, py) = if a.data.is_empty() { (vec![default_corpus()?], true) } else { (a.data.clone(), false) };
    let text = read_text(&paths, a.max_bytes, py)?;
    let corpus = Corpus::split(text.bytes().map(u32::from).collect(), 0.05)?;
    let l = a.train_len;
    let mults = [1usize, 2, 4, 8];
    let mut rows: Vec<(String, Vec<f64>)> = vec![];
    for kind in [PosKind::Sinusoidal, PosKind::Learned, PosKind::Rope, PosKind::Alibi, PosKind::T5, PosKind::None] {
        let cfg = GptConfig { dim: 96, n_layer: 3, n_head: 4, n_kv_head: 4, hidden: 384, max_seq: 8 * l, pos: kind, seed: 1, ..GptConfig::default() };
        let settings = TrainSettings { batch: a.batch, seq_len: l, steps: a.steps, lr: 2e-3, min_lr: 2e-4, warmup: a.steps / 20 + 1, eval_windows: a.eval_windows, seed: 1, ..TrainSettings::default() };
        let mut t = Trainer::new(cfg, settings)?;
        let t0 = std::time::Instant::now();
        let mut last = 0.0;
        for _ in 0..a.steps {
            last = t.step(&corpus)?.loss;
        }
        let name = serde_json::to_value(kind)?.as_str().unwrap_or("?").to_string();
        eprintln!("{name}: trained {} steps in {:.0} s, final train loss {last:.3}", a.steps, t0.elapsed().as_secs_f64());
        let ppl = |t: &Trainer| -> Result<Vec<f64>> { mults.iter().map(|m| Ok(t.evaluate(&corpus, m * l)?.exp())).collect() };
        rows.push((name, ppl(&t)?));
        if kind == PosKind::Rope {
            for (label, scale) in [("rope+ntk", RopeScaling::Ntk { factor: 1.0 }), ("rope+yarn", RopeScaling::yarn(1.0, l))] {
                let mut v = vec![];
                for &m in &mults {
                    let f = m as f64;
                    t.model.set_rope_scaling(match scale {
                        RopeScaling::Ntk { .. } if m > 1 => RopeScaling::Ntk { factor: f },
                        RopeScaling::Yarn { .. } if m > 1 => RopeScaling::yarn(f, l),
                        _ => RopeScaling::None,
                    });
                    v.push(t.evaluate(&corpus, m * l)?.exp());
                }
                t.model.set_rope_scaling(RopeScaling::None);
                rows.push((label.to_string(), v));
            }
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut md = format!("| encoding | {} |\n|---|{}\n", mults.iter().map(|m| format!("ppl @ {}", m * l)).collect::<Vec<_>>().join(" | "), "---|".repeat(mults.len()));
    for (n, v) in &rows {
        let _ = writeln!(md, "| {n} | {} |", v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" | "));
    }
    std::fs::write(a.out.join("results.md"), &md)?;
    std::fs::write(a.out.join("perplexity.svg"), svg_plot(&rows, &mults, l))?;
    let j = json!({ "train_len": l, "steps": a.steps, "batch": a.batch, "lengths": mults.iter().map(|m| m * l).collect::<Vec<_>>(),
        "perplexity": rows.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>() });
    std::fs::write(a.out.join("results.json"), serde_json::to_string_pretty(&j)? + "\n")?;
    print!("{md}");
    eprintln!("wrote {}/results.md, perplexity.svg, results.json", a.out.display());
    Ok(())
}

/// A line chart of log perplexity against evaluation length, as SVG (text, no font files).
fn svg_plot(rows: &[(String, Vec<f64>)], mults: &[usize], l: usize) -> String {
    let (w, h, pad) = (720.0, 440.0, 60.0);
    let ys: Vec<f64> = rows.iter().flat_map(|(_, v)| v.iter().map(|x| x.max(1.0).ln())).collect();
    let (lo, hi) = (ys.iter().cloned().fold(f64::INFINITY, f64::min), ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max).max(1e-9));
    let x = |i: usize| pad + (w - 2.5 * pad) * i as f64 / (mults.len() - 1).max(1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v.max(1.0).ln() - lo) / (hi - lo).max(1e-9);
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(s, "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">Held-out perplexity (log scale) vs evaluation length, trained at L = {l}</text>", w / 2.0);
    let _ = writeln!(s, "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>", h - pad, w - 1.5 * pad, h - pad, h - pad);
    for (i, m) in mults.iter().enumerate() {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>", x(i), h - pad + 18.0, m * l);
    }
    for k in 0..=4 {
        let v = (lo + (hi - lo) * k as f64 / 4.0).exp();
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.1}</text>", pad - 6.0, y(v) + 4.0);
    }
    for (ri, (name, v)) in rows.iter().enumerate() {
        let c = colors[ri % colors.len()];
        let pts: Vec<String> = v.iter().enumerate().map(|(i, p)| format!("{:.1},{:.1}", x(i), y(*p))).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>", pts.join(" "));
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{name}</text>", w - 1.4 * pad, pad + 16.0 * ri as f64);
    }
    s + "</svg>\n"
}
