//! augur-server: an OpenAI-compatible HTTP API over one loaded model.
//!
//! - `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming as
//!   server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /health`,
//!   `GET /metrics` (Prometheus text).
//! - Scheduling: continuous batching. One engine thread decodes one token for every running
//!   sequence per forward pass, admitting new requests between steps; at most `max_concurrency`
//!   requests run at once, up to `max_queue` more wait in FIFO order, beyond that 429. A client
//!   that disconnects mid-stream leaves the batch at the next step. (With `--spec`, requests run
//!   one blocking generation each instead.)
//! - Every error is OpenAI's error JSON (`api::ApiError` maps them in one place).
//!
//! Run the server in process and ask it for a chat completion (a real deployment calls
//! [`serve`], which binds `cfg.host:cfg.port` and stops on Ctrl-C or SIGTERM):
//!
//! ```
//! use augur_models::{tiny, Model};
//! use augur_server::{router, App, ServerConfig};
//! use axum::body::Body;
//! use axum::http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let path = std::env::temp_dir().join(format!("augur-doc-server-{}.gguf", std::process::id()));
//! tiny::write_gguf(&path, false, Some(augur_core::QuantType::Q8_0), 1)?;
//! let app = App::new(Model::open(&path)?, ServerConfig::default())?;
//! let body = r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}"#;
//! let req = Request::post("/v1/chat/completions").header("content-type", "application/json").body(Body::from(body))?;
//! let res = router(app).oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! let json: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
//! assert_eq!(json["object"], "chat.completion");
//! assert!(json["choices"][0]["message"]["content"].is_string());
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod api;
mod error;
mod handlers;
mod metrics;
mod schedule;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use augur_models::{Activations, Model};

pub use error::ApiError;
use metrics::Metrics;
use schedule::Scheduler;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind.
    pub port: u16,
    /// Required `Authorization: Bearer` key, if any.
    pub api_key: Option<String>,
    /// Generations running at once.
    pub max_concurrency: usize,
    /// Requests waiting beyond those; more get 429.
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// The model id reported by `/v1/models` and in responses.
    pub model_name: String,
    /// `prompt-lookup` or `early-exit:L` to decode speculatively (output unchanged).
    pub spec: Option<String>,
    /// Representation of matmul inputs.
    pub activations: Activations,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_concurrency: 8,
            max_queue: 16,
            max_body_bytes: 1 << 20,
            model_name: "augur".into(),
            spec: None,
            activations: Activations::default(),
        }
    }
}

/// Shared state of the handlers.
pub struct App {
    /// The served model.
    pub model: Model,
    /// The server's settings.
    pub cfg: ServerConfig,
    metrics: Metrics,
    scheduler: Scheduler,
    /// Set on shutdown: running generations stop at their next token.
    stopping: AtomicBool,
    /// The continuous-batching engine's queue (None with `--spec`, which runs per request).
    engine: Option<std::sync::Mutex<std::sync::mpsc::Sender<handlers::EngineJob>>>,
}

impl App {
    /// Shared state for `model` with `cfg` (fails on invalid settings).
    pub fn new(model: Model, cfg: ServerConfig) -> Result<Arc<Self>, String> {
        if let Some(spec) = &cfg.spec {
            handlers::check_spec(spec, &model)?;
        }
        let scheduler = Scheduler::new(cfg.max_concurrency.max(1), cfg.max_queue);
        let batching = cfg.spec.is_none();
        let (tx, rx) = std::sync::mpsc::channel();
        let app = Arc::new(App {
            model,
            cfg,
            metrics: Metrics::default(),
            scheduler,
            stopping: AtomicBool::new(false),
            engine: batching.then(|| std::sync::Mutex::new(tx)),
        });
        if batching {
            let engine_app = app.clone();
            std::thread::Builder::new()
                .name("augur-engine".into())
                .spawn(move || handlers::engine(engine_app, rx))
                .map_err(|e| format!("starting the engine thread: {e}"))?;
        }
        Ok(app)
    }
}

/// The router, for serving or for in-process tests.
pub fn router(app: Arc<App>) -> axum::Router {
    handlers::router(app)
}

/// Serve until Ctrl-C or SIGTERM, then stop accepting, let running requests end (generations are
/// told to stop) and return within `drain` seconds.
pub async fn serve(app: Arc<App>, drain: std::time::Duration) -> std::io::Result<()> {
    let addr: SocketAddr = format!("{}:{}", app.cfg.host, app.cfg.port)
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad host/port: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("augur: serving {} on http://{}", app.cfg.model_name, listener.local_addr()?);
    let stop_app = app.clone();
    let shutdown = async move {
        wait_for_signal().await;
        eprintln!("augur: shutting down: no new connections; stopping running generations");
        stop_app.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(shutdown);
    tokio::select! {
        r = server => r,
        _ = async { wait_for_signal().await; tokio::time::sleep(drain).await } => {
            eprintln!("augur: drain timeout; exiting");
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
