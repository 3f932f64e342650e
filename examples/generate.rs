//! Load a model and generate, through augur's library API.
//!
//! `cargo run --release -p augur-examples --example generate -- [MODEL.gguf] "prompt"`
//! (without a model path it uses the default model, fetched into the cache on first use).

use std::ops::ControlFlow;
use std::path::PathBuf;

use augur_decode::chat::{ChatTemplate, Message};
use augur_decode::{generate, GenerateConfig};
use augur_models::{hub, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.first() {
        Some(p) if p.ends_with(".gguf") => PathBuf::from(args.remove(0)),
        _ => hub::ensure_default_model()?,
    };
    let prompt = args.pop().unwrap_or_else(|| "Write a haiku about the ocean.".into());
    let model = Model::open(&path)?;
    let text = ChatTemplate::for_model(&model)?.render(&[Message::new("user", &prompt)], true)?;
    let ids = model.tokenizer.encode(&text)?;
    let cfg = GenerateConfig { max_tokens: 64, ..Default::default() };
    let summary = generate(&model, &ids, &cfg, |ev| {
        print!("{}", ev.text);
        ControlFlow::Continue(())
    })?;
    println!("\n[{} tokens, {:.1} tok/s]", summary.generated.len(), summary.decode_tok_per_s());
    Ok(())
}
