//! Routes, request handling and the bridge from blocking generation to (streamed) responses.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use augur_decode::chat::{ChatTemplate, Message};
use augur_decode::speculative::{self, Drafter, SpecConfig};
use augur_decode::{generate, GenerateConfig, SamplerConfig, StopReason, Summary, TokenEvent};
use augur_models::Model;
use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{self, ChatRequest, CompletionRequest, Prompt, Settings};
use crate::{ApiError, App};

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// Refuse `--spec` values the server cannot serve (it builds a drafter per request).
pub fn check_spec(spec: &str, model: &Model) -> Result<(), String> {
    drafter(spec, model).map(|_| ())
}

fn drafter(spec: &str, model: &Model) -> Result<Box<dyn Drafter + Send>, String> {
    // A draft model would be loaded per request; the server takes the stateless drafters only.
    if spec.starts_with("draft:") {
        return Err(format!("--spec `{spec}` is not supported by the server (prompt-lookup, early-exit:L)"));
    }
    speculative::from_spec(spec, model, speculative::PromptLookup::DEFAULT_MAX_N, 1, 6).map_err(|e| e.to_string())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}-{n:x}")
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.cfg.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let limit = app.cfg.max_body_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    to_bytes(body, limit).await.map(|b| b.to_vec()).map_err(|_| ApiError::too_large(limit))
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{"id": app.cfg.model_name, "object": "model", "created": 0, "owned_by": "augur"}]})).into_response()
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(app.scheduler.active(), app.scheduler.queued());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// What a request asks the engine for.
struct Job {
    ids: Vec<u32>,
    settings: Settings,
    max_tokens: usize,
    /// Top alternatives per token, if log probabilities were requested.
    logprobs: Option<usize>,
    chat: bool,
    /// Seed when the request gives none.
    seed: u64,
}

/// One generated token as the response layer sees it.
struct Piece {
    index: usize,
    text: String,
    logprob: Option<Value>,
}

enum Ev {
    Piece(Piece),
    Done { index: usize, finish: &'static str, tokens: usize },
    Failed(ApiError),
}

fn finish_reason(s: &Summary) -> &'static str {
    match s.stop {
        StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

fn log_softmax_lse(logits: &[f32]) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + logits.iter().map(|&l| ((l - m) as f64).exp()).sum::<f64>().ln() as f32
}

/// OpenAI logprob objects for token `id` chosen from `logits` (chat or legacy completions shape).
fn logprob_entry(model: &Model, id: u32, logits: &[f32], top: usize, chat: bool) -> Value {
    let lse = log_softmax_lse(logits);
    let tok = |i: u32| model.tokenizer.decode(&[i]).unwrap_or_default();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        idx.truncate(k);
        idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
    } else {
        idx.clear();
    }
    let lp = |i: u32| logits[i as usize] - lse;
    let text = tok(id);
    if chat {
        let tops: Vec<Value> = idx.iter().map(|&i| json!({"token": tok(i), "logprob": lp(i), "bytes": tok(i).into_bytes()})).collect();
        json!({"token": text, "logprob": lp(id), "bytes": text.clone().into_bytes(), "top_logprobs": tops})
    } else {
        let tops: serde_json::Map<String, Value> = idx.iter().map(|&i| (tok(i), json!(lp(i)))).collect();
        json!({"token": text, "logprob": lp(id), "top": tops})
    }
}

/// Run every choice of `job` on a blocking thread, sending events to `tx`. Stops at the next
/// token when the receiver is gone (client disconnected) or the server is shutting down.
fn run_job(app: Arc<App>, job: Job, tx: mpsc::Sender<Ev>) {
    let model = &app.model;
    app.metrics.prompt_tokens.fetch_add((job.ids.len() * job.settings.n) as u64, Ordering::Relaxed);
    for index in 0..job.settings.n {
        let cfg = choice_config(&app, &job, index);
        let on_token = |ev: &TokenEvent| send_piece(&app, &tx, index, job.logprobs, job.chat, ev);
        let result = match app.cfg.spec.as_deref() {
            Some(spec) => drafter(spec, model).map_err(ApiError::internal).and_then(|mut d| {
                speculative::generate(model, &job.ids, &cfg, &SpecConfig::new(6), d.as_mut(), on_token)
                    .map(|(s, st)| {
                        app.metrics.spec_passes.fetch_add(st.target_passes as u64, Ordering::Relaxed);
                        app.metrics.spec_emitted.fetch_add(st.emitted as u64, Ordering::Relaxed);
                        s
                    })
                    .map_err(|e| ApiError::internal(e.to_string()))
            }),
            None => generate(model, &job.ids, &cfg, on_token).map_err(|e| ApiError::internal(e.to_string())),
        };
        match result {
            Ok(s) => {
                app.metrics.generated_tokens.fetch_add(s.generated.len() as u64, Ordering::Relaxed);
                app.metrics.decode_us.fetch_add(s.decode.as_micros() as u64, Ordering::Relaxed);
                if s.stop == StopReason::Callback {
                    return; // client gone or shutting down
                }
                if tx.blocking_send(Ev::Done { index, finish: finish_reason(&s), tokens: s.generated.len() }).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Ev::Failed(e));
                return;
            }
        }
    }
}

/// The generation settings of choice `index` of a job.
fn choice_config(app: &App, job: &Job, index: usize) -> GenerateConfig {
    let base_seed = job.settings.seed.unwrap_or(job.seed);
    GenerateConfig {
        max_tokens: job.max_tokens,
        sampler: SamplerConfig {
            temperature: job.settings.temperature,
            top_p: job.settings.top_p,
            presence_penalty: job.settings.presence_penalty,
            frequency_penalty: job.settings.frequency_penalty,
            seed: base_seed.wrapping_add(index as u64),
            ..Default::default()
        },
        stop: job.settings.stop.clone(),
        ignore_eos: false,
        activations: app.cfg.activations,
        ..Default::default()
    }
}

/// Send one token to the client; `Break` when it is gone or the server is stopping.
fn send_piece(app: &App, tx: &mpsc::Sender<Ev>, index: usize, logprobs: Option<usize>, chat: bool, ev: &TokenEvent) -> ControlFlow<()> {
    if app.stopping.load(Ordering::Relaxed) {
        return ControlFlow::Break(());
    }
    let logprob = logprobs.map(|k| logprob_entry(&app.model, ev.id, ev.logits, k, chat));
    match tx.blocking_send(Ev::Piece(Piece { index, text: ev.text.to_string(), logprob })) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

/// A job handed to the batching engine, with its slot (freed when its last choice ends).
pub struct EngineJob {
    job: Job,
    tx: mpsc::Sender<Ev>,
    slot: crate::schedule::Slot,
}

struct Live {
    seq: augur_decode::sequence::Sequence,
    index: usize,
    tx: mpsc::Sender<Ev>,
    logprobs: Option<usize>,
    chat: bool,
    /// An error was reported to the client; the sequence leaves the batch.
    failed: bool,
    _slot: Arc<crate::schedule::Slot>,
}

/// Continuous batching: every step decodes one token for each live sequence in one forward
/// pass (up to 16 rows; each row's numbers are those of a solo run), admitting (prefilling) up
/// to two new requests between steps.
pub fn engine(app: Arc<App>, rx: std::sync::mpsc::Receiver<EngineJob>) {
    use augur_decode::sequence::Sequence;
    let model = &app.model;
    let vocab = model.llama.cfg.vocab;
    let mut scratch = augur_models::State::new(&model.llama.cfg);
    scratch.activations = app.cfg.activations;
    let mut live: Vec<Live> = Vec::new();
    let finish = |app: &App, l: Live| {
        let (tx, index) = (l.tx.clone(), l.index);
        let s = l.seq.finish();
        app.metrics.generated_tokens.fetch_add(s.generated.len() as u64, Ordering::Relaxed);
        app.metrics.decode_us.fetch_add(s.decode.as_micros() as u64, Ordering::Relaxed);
        if s.stop != StopReason::Callback {
            let _ = tx.blocking_send(Ev::Done { index, finish: finish_reason(&s), tokens: s.generated.len() });
        }
    };
    let mut waiting: std::collections::VecDeque<EngineJob> = std::collections::VecDeque::new();
    loop {
        if live.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        waiting.extend(rx.try_iter());
        // Prefill at most two new requests between decode steps, so a burst of arrivals does
        // not stall the streams already running.
        let admit = if live.is_empty() { 1 } else { 2 }.min(waiting.len());
        for EngineJob { job, tx, slot } in waiting.drain(..admit) {
            app.metrics.prompt_tokens.fetch_add((job.ids.len() * job.settings.n) as u64, Ordering::Relaxed);
            let slot = Arc::new(slot);
            for index in 0..job.settings.n {
                let cfg = choice_config(&app, &job, index);
                let (lp, chat) = (job.logprobs, job.chat);
                match Sequence::start(model, &job.ids, &cfg, |ev| send_piece(&app, &tx, index, lp, chat, ev)) {
                    Ok(seq) => {
                        let l = Live { seq, index, tx: tx.clone(), logprobs: lp, chat, failed: false, _slot: slot.clone() };
                        if l.seq.finished().is_some() {
                            finish(&app, l);
                        } else {
                            live.push(l);
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Ev::Failed(ApiError::internal(e.to_string())));
                        break;
                    }
                }
            }
        }
        for chunk in live.chunks_mut(augur_models::MAX_BATCH) {
            let toks: Vec<u32> = chunk.iter().map(|l| l.seq.next_input().expect("live sequences have an input")).collect();
            let logits = {
                let mut refs: Vec<&mut augur_models::State> = chunk.iter_mut().map(|l| &mut l.seq.state).collect();
                match model.llama.forward_many(&mut scratch, &mut refs, &toks) {
                    Ok(l) => l.to_vec(),
                    Err(e) => {
                        for l in chunk.iter_mut() {
                            let _ = l.tx.blocking_send(Ev::Failed(ApiError::internal(e.to_string())));
                            l.failed = true;
                        }
                        continue;
                    }
                }
            };
            for (row, l) in chunk.iter_mut().enumerate() {
                let Live { seq, index, tx, logprobs, chat, failed, .. } = l;
                let r = seq.advance(model, &logits[row * vocab..(row + 1) * vocab], &mut |ev| send_piece(&app, tx, *index, *logprobs, *chat, ev));
                if let Err(e) = r {
                    let _ = tx.blocking_send(Ev::Failed(ApiError::internal(e.to_string())));
                    *failed = true;
                }
            }
        }
        let (done, rest): (Vec<Live>, Vec<Live>) = live.into_iter().partition(|l| l.failed || l.seq.finished().is_some() || l.tx.is_closed());
        live = rest;
        for l in done.into_iter().filter(|l| !l.failed) {
            finish(&app, l);
        }
    }
}

/// Token ids, context check and token budget of a request.
fn prepare(app: &App, ids: Vec<u32>, settings: Settings, default_max: usize, logprobs: Option<usize>, chat: bool) -> Result<Job, ApiError> {
    let ctx = app.model.llama.cfg.context;
    if ids.is_empty() {
        return Err(ApiError::invalid("The prompt is empty.", Some(if chat { "messages" } else { "prompt" })));
    }
    if ids.len() >= ctx {
        return Err(ApiError::invalid(
            format!("This model's maximum context length is {ctx} tokens; the prompt has {} tokens. Shorten it.", ids.len()),
            Some(if chat { "messages" } else { "prompt" }),
        )
        .with_code("context_length_exceeded"));
    }
    let room = ctx - ids.len();
    let max_tokens = match settings.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::invalid(
                format!("This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion).", ids.len() + m, ids.len()),
                Some("max_tokens"),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m,
        None => default_max.min(room),
    };
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
    Ok(Job { ids, settings, max_tokens, logprobs, chat, seed })
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let r = async {
        authorize(&app, &headers)?;
        let body = read_body(&app, &headers, body).await?;
        let req: ChatRequest = api::parse(&body)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty", Some("messages")));
        }
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (_, Some(k)) if k > 20 => return Err(ApiError::invalid("top_logprobs must be in [0, 20]", Some("top_logprobs"))),
            (false, Some(_)) => return Err(ApiError::invalid("top_logprobs requires logprobs: true", Some("top_logprobs"))),
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, None) => None,
        };
        let msgs: Vec<Message> = req.messages.iter().map(|m| Ok(Message::new(&m.role, &m.text()?))).collect::<Result<_, ApiError>>()?;
        let tpl = ChatTemplate::for_model(&app.model).map_err(|e| ApiError::internal(e.to_string()))?;
        let prompt = tpl.render(&msgs, true).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let ids = app.model.tokenizer.encode(&prompt).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let settings = req.common.settings()?;
        prepare(&app, ids, settings, 4096, logprobs, true)
    }
    .await;
    answer(app, r, "chat.completion").await
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let r = async {
        authorize(&app, &headers)?;
        let body = read_body(&app, &headers, body).await?;
        let req: CompletionRequest = api::parse(&body)?;
        let prompt = match req.prompt {
            Prompt::One(s) => s,
            Prompt::Many(v) if v.len() == 1 => v.into_iter().next().unwrap(),
            Prompt::Many(_) => return Err(ApiError::invalid("only one prompt per request is supported", Some("prompt"))),
        };
        let logprobs = match req.logprobs {
            Some(k) if k > 20 => return Err(ApiError::invalid("logprobs must be in [0, 20]", Some("logprobs"))),
            k => k.map(|k| k as usize),
        };
        let ids = app.model.tokenizer.encode(&prompt).map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
        let settings = req.common.settings()?;
        prepare(&app, ids, settings, 16, logprobs, false)
    }
    .await;
    answer(app, r, "text_completion").await
}

/// Run a prepared job, or answer with the error that stopped it.
async fn answer(app: Arc<App>, job: Result<Job, ApiError>, object: &'static str) -> Response {
    match job {
        Ok(job) => respond(app, job, object).await,
        Err(e) => {
            app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

/// Admit the job, run it, and answer with one JSON body or an SSE stream.
async fn respond(app: Arc<App>, job: Job, object: &'static str) -> Response {
    let slot = match app.scheduler.acquire().await {
        Ok(s) => s,
        Err(e) => {
            app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return e.into_response();
        }
    };
    let chat = object == "chat.completion";
    let (stream, include_usage, n, prompt_tokens) = (job.settings.stream, job.settings.include_usage, job.settings.n, job.ids.len());
    let (tx, mut rx) = mpsc::channel::<Ev>(64);
    match &app.engine {
        // Plain decoding: the batching engine (the slot is released when the job's last choice ends).
        Some(engine) => {
            let sent = engine.lock().map(|e| e.send(EngineJob { job, tx, slot }).is_ok()).unwrap_or(false);
            if !sent {
                return ApiError::internal("the generation engine has stopped").into_response();
            }
        }
        // Speculative decoding: one blocking generation per request.
        None => {
            let worker_app = app.clone();
            tokio::task::spawn_blocking(move || {
                let _slot = slot; // released when the generation ends (or stops for a gone client)
                run_job(worker_app, job, tx)
            });
        }
    }
    let id = request_id(if chat { "chatcmpl" } else { "cmpl" });
    let created = now();
    let model_name = app.cfg.model_name.clone();
    if !stream {
        let mut texts = vec![String::new(); n];
        let mut lps: Vec<Vec<Value>> = vec![Vec::new(); n];
        let mut finish = vec!["stop"; n];
        let mut completion_tokens = 0;
        while let Some(ev) = rx.recv().await {
            match ev {
                Ev::Piece(p) => {
                    texts[p.index].push_str(&p.text);
                    lps[p.index].extend(p.logprob);
                }
                Ev::Done { index, finish: f, tokens } => {
                    finish[index] = f;
                    completion_tokens += tokens;
                }
                Ev::Failed(e) => return e.into_response(),
            }
        }
        let choices: Vec<Value> = (0..n)
            .map(|i| {
                let logprobs = if lps[i].is_empty() { Value::Null } else { logprobs_json(&lps[i], chat) };
                if chat {
                    json!({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": logprobs, "finish_reason": finish[i]})
                } else {
                    json!({"index": i, "text": texts[i], "logprobs": logprobs, "finish_reason": finish[i]})
                }
            })
            .collect();
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
        return Json(json!({"id": id, "object": object, "created": created, "model": model_name, "choices": choices, "usage": usage})).into_response();
    }
    let (etx, erx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let chunk_object = if chat { "chat.completion.chunk" } else { "text_completion" };
    tokio::spawn(async move {
        let chunk = |choice: Value| json!({"id": id, "object": chunk_object, "created": created, "model": model_name, "choices": [choice]});
        let send = |v: Value| Ok(Event::default().data(v.to_string()));
        if chat {
            for i in 0..n {
                let first = chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}));
                if etx.send(send(first)).await.is_err() {
                    return;
                }
            }
        }
        let mut completion_tokens = 0;
        while let Some(ev) = rx.recv().await {
            let v = match ev {
                Ev::Piece(p) => {
                    if p.text.is_empty() && p.logprob.is_none() {
                        continue;
                    }
                    let lp = p.logprob.map_or(Value::Null, |l| logprobs_json(&[l], chat));
                    if chat {
                        chunk(json!({"index": p.index, "delta": {"content": p.text}, "logprobs": lp, "finish_reason": null}))
                    } else {
                        chunk(json!({"index": p.index, "text": p.text, "logprobs": lp, "finish_reason": null}))
                    }
                }
                Ev::Done { index, finish, tokens } => {
                    completion_tokens += tokens;
                    if chat {
                        chunk(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}))
                    } else {
                        chunk(json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish}))
                    }
                }
                Ev::Failed(e) => e.body(),
            };
            if etx.send(send(v)).await.is_err() {
                return; // client gone: dropping rx stops the generation at its next token
            }
        }
        if include_usage {
            let usage = json!({"id": id, "object": chunk_object, "created": created, "model": model_name, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}});
            let _ = etx.send(send(usage)).await;
        }
        let _ = etx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(erx)).keep_alive(KeepAlive::default()).into_response()
}

/// Per-token logprob entries as the endpoint's `logprobs` object.
fn logprobs_json(entries: &[Value], chat: bool) -> Value {
    if chat {
        let content: Vec<Value> = entries
            .iter()
            .map(|e| json!({"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"], "top_logprobs": e["top_logprobs"]}))
            .collect();
        return json!({"content": content});
    }
    let mut offset = 0usize;
    let mut text_offset = Vec::new();
    for e in entries {
        text_offset.push(offset);
        offset += e["token"].as_str().map_or(0, str::len);
    }
    json!({
        "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| e["top"].clone()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}
