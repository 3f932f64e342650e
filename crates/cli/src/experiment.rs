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
    /// Where the table (results.md), the plot (perplexity.png) and results.json go.
    #[arg(long, default_value = "pos-extrapolation")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2 << 20)]
    pub max_bytes: usize,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Redraw the table and plot from an earlier run's results.json instead of training.
    #[arg(long)]
    pub replot: Option<PathBuf>,
}

pub fn main(e: Experiment) -> Result<()> {
    let Experiment::PosExtrapolation(a) = e;
    if let Some(json) = &a.replot {
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?)?;
        let l = j["train_len"].as_u64().context("results.json lacks train_len")? as usize;
        let rows: Vec<(String, Vec<f64>)> = j["perplexity"]
            .as_object()
            .context("results.json lacks perplexity")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()))
            .collect();
        std::fs::create_dir_all(&a.out)?;
        png_plot(&a.out.join("perplexity.png"), &rows, &[1, 2, 4, 8], l)?;
        eprintln!("wrote {}/perplexity.png", a.out.display());
        return Ok(());
    }
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
    png_plot(&a.out.join("perplexity.png"), &rows, &mults, l)?;
    let j = json!({ "train_len": l, "steps": a.steps, "batch": a.batch, "lengths": mults.iter().map(|m| m * l).collect::<Vec<_>>(),
        "perplexity": rows.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>() });
    std::fs::write(a.out.join("results.json"), serde_json::to_string_pretty(&j)? + "\n")?;
    print!("{md}");
    eprintln!("wrote {}/results.md, perplexity.png, results.json", a.out.display());
    Ok(())
}

/// A line chart of perplexity (log scale) against evaluation length, as PNG (plotters, with the
/// DejaVu Sans font compiled in, so no system fonts are needed).
fn png_plot(path: &std::path::Path, rows: &[(String, Vec<f64>)], mults: &[usize], l: usize) -> Result<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    // Registering twice (a second experiment in one process) is harmless.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let ys = rows.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = ys.fold((f64::INFINITY, 0f64), |(a, b), y| (a.min(y), b.max(y)));
    let xs: Vec<f64> = mults.iter().map(|m| (m * l) as f64).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Held-out perplexity vs evaluation length (trained at L = {l})"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((xs[0] * 0.9..xs[xs.len() - 1] * 1.1).log_scale(), (lo * 0.9..hi * 1.1).log_scale())
        .map_err(|x| e(&x))?;
    chart.configure_mesh().x_desc("evaluation length (tokens)").y_desc("perplexity").draw().map_err(|x| e(&x))?;
    for (i, (name, v)) in rows.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(xs.iter().copied().zip(v.iter().copied()), color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw().map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
