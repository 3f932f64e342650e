//! `augur`: run, chat with, inspect and benchmark language models.

mod bench;
mod bench_gpu;
mod bench_train;
mod chat;
mod common;
mod distill;
mod experiment;
mod inspect;
mod launch;
mod run;
mod run_gpt;
mod serve;
mod spec_bench;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "augur", version, about = "Run large language models fast, on the CPU first")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a continuation of PROMPT (or of --prompt-ids) and stream it to stdout.
    Run(run::Args),
    /// Interactive chat with the model's chat template.
    Chat(chat::Args),
    /// List a GGUF file's metadata and tensors.
    Inspect(inspect::Args),
    /// Measure prefill and decode tokens/s (median of several runs), printed as JSON.
    Bench(bench::Args),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::Args),
    /// Plain decoding vs each drafter on a task set: tau, tokens/s, speedup per group.
    SpecBench(spec_bench::Args),
    /// Train a GPT from scratch on text (byte-level, or a model's tokenizer).
    Train(train::Args),
    /// Self-distillation data: the model's own responses to a prompt set (and its hidden states).
    DistillData(distill::DataArgs),
    /// Train Medusa heads for a model on `distill-data` output (use with `--spec medusa:FILE`).
    TrainMedusa(distill::MedusaArgs),
    /// Train DeepSeek-style MTP modules for a model on `distill-data` output (use with
    /// `--spec mtp:FILE`).
    TrainMtp(distill::MtpArgs),
    /// Distil a draft model from the model's first blocks on `distill-data` output (use with
    /// `--spec draft:FILE`).
    Distill(distill::DraftArgs),
    /// Research experiments built on `augur train` (e.g. pos-extrapolation).
    #[command(subcommand)]
    Experiment(experiment::Experiment),
    /// List the tensor op registry: canonical names, aliases, arguments, differentiability.
    Ops,
    /// Download the default model into the cache (other commands do this on first use).
    Fetch,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Chat(a) => chat::main(a),
        Cmd::Inspect(a) => inspect::main(a),
        Cmd::Bench(a) => bench::main(a),
        Cmd::SpecBench(a) => spec_bench::main(a),
        Cmd::Serve(a) => serve::main(a),
        Cmd::Train(a) => train::main(a),
        Cmd::DistillData(a) => distill::data_main(a),
        Cmd::TrainMedusa(a) => distill::medusa_main(a),
        Cmd::TrainMtp(a) => distill::mtp_main(a),
        Cmd::Distill(a) => distill::draft_main(a),
        Cmd::Experiment(e) => experiment::main(e),
        Cmd::Ops => {
            for o in augur_core::registry::OPS {
                let aliases = if o.aliases.is_empty() { String::new() } else { format!(" (also {})", o.aliases.join(", ")) };
                println!("{:<28} {:<9} {}{aliases}\n{:<38} {}", o.name, if o.differentiable { "grad" } else { "no-grad" }, o.args, "", o.doc);
            }
            println!("dtypes: {}; devices: {}", augur_core::registry::DTYPES.join(", "), augur_core::registry::DEVICES.join(", "));
            Ok(())
        }
        Cmd::Fetch => augur_models::hub::ensure_default_model().map(|p| println!("{}", p.display())).map_err(Into::into),
    };
    if let Err(e) = result {
        // A closed stdout (e.g. piped into `head`) is not an error worth reporting.
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            std::process::exit(0);
        }
        eprintln!("augur: error: {e:#}");
        std::process::exit(1);
    }
}
