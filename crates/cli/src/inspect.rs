//! `augur inspect`: a GGUF file's metadata and tensors.

use std::path::PathBuf;

use anyhow::Result;
use augur_formats::gguf::Gguf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .gguf file.
    pub file: PathBuf,
}

pub fn main(a: Args) -> Result<()> {
    let g = Gguf::open(&a.file)?;
    println!("GGUF v{}  {} metadata keys  {} tensors  alignment {}", g.version, g.metadata().len(), g.tensors().len(), g.alignment);
    println!("\nmetadata:");
    for (k, v) in g.metadata() {
        println!("  {k} = {v}");
    }
    println!("\ntensors:");
    let mut total = 0u64;
    for t in g.tensors() {
        total += t.size.unwrap_or(0);
        println!("  {:<32} {:<6} {:?}", t.name, t.type_name(), t.shape);
    }
    println!("\n{} tensors, {:.1} MiB of data", g.tensors().len(), total as f64 / (1 << 20) as f64);
    Ok(())
}
