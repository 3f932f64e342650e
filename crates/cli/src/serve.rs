//! `augur serve`: the OpenAI-compatible HTTP server.

use anyhow::{anyhow, Result};
use augur_server::{serve, App, ServerConfig};

use crate::common::{ModelArgs, PrecisionArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the API routes.
    #[arg(long, env = "AUGUR_API_KEY")]
    pub api_key: Option<String>,
    /// Requests decoded together (continuous batching; each step is one forward pass over all of
    /// them). More wait in FIFO order.
    #[arg(long, default_value_t = 8)]
    pub max_concurrency: usize,
    /// Requests waiting for a slot before the server answers 429.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Speculative decoding for every request: `prompt-lookup` or `early-exit:L` (output unchanged).
    #[arg(long)]
    pub spec: Option<String>,
    /// Model id reported by the API (default: the file name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Seconds to let running requests finish after Ctrl-C / SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub drain: u64,
}

pub fn main(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let name = a.model_name.clone().unwrap_or_else(|| {
        model.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "augur".into())
    });
    let cfg = ServerConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        max_concurrency: a.max_concurrency.max(1),
        max_queue: a.max_queue,
        max_body_bytes: a.max_body,
        model_name: name,
        spec: a.spec,
        activations: a.precision.get(),
    };
    let app = App::new(model, cfg).map_err(|e| anyhow!(e))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(app, std::time::Duration::from_secs(a.drain)))?;
    Ok(())
}
