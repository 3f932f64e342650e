//! The server in process (tower `oneshot`) on a tiny model augur writes itself: OpenAI error JSON
//! for every kind of bad input, 429 when full, a disconnected client freeing its slot, concurrent
//! requests isolated from each other, and a fuzzed request parser that never fails badly.

use std::sync::Arc;

use augur_models::{tiny, Model};
use augur_server::{router, App, ServerConfig};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

fn app(cfg: ServerConfig) -> Arc<App> {
    let dir = std::env::temp_dir().join(format!("augur-server-{}-{}", std::process::id(), cfg.port));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tiny.gguf");
    if !p.exists() {
        tiny::write_gguf(&p, false, Some(augur_core::QuantType::Q8_0), 5).unwrap();
    }
    App::new(Model::open(&p).unwrap(), cfg).unwrap()
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(body.into()).unwrap()
}

async fn call(app: &Arc<App>, req: Request<Body>) -> (StatusCode, Value) {
    let res = router(app.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
    (status, v)
}

fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "not an OpenAI error: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "error lacks param/code: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_openai_errors() {
    let a = app(ServerConfig { port: 1, max_body_bytes: 2000, ..Default::default() });
    let (s, v) = call(&a, post("/v1/chat/completions", "{not json")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_openai_error(&v);
    let (s, v) = call(&a, post("/v1/chat/completions", r#"{"messages": "hi"}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("invalid type"), "{v}");
    let (s, v) = call(&a, post("/v1/completions", r#"{"prompt": "a", "temperature": "hot"}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(&a, post("/v1/completions", r#"{"prompt": "a", "max_tokens": 100000}"#)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("context_length_exceeded")));
    let long = "hello ".repeat(400);
    let (s, v) = call(&a, post("/v1/completions", json!({"prompt": long}).to_string())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_openai_error(&v);
    let a2 = app(ServerConfig { port: 2, ..Default::default() });
    let (s, v) = call(&a2, post("/v1/completions", json!({"prompt": long}).to_string())).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("context_length_exceeded")), "prompt past the context");
    let (s, v) = call(&a, Request::get("/v1/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_openai_error(&v);
    let (s, _) = call(&a, post("/v1/completions", r#"{"prompt": "a", "n": 0}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_is_enforced() {
    let a = app(ServerConfig { port: 3, api_key: Some("k".into()), ..Default::default() });
    let (s, v) = call(&a, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let ok = Request::get("/v1/models").header("authorization", "Bearer k").body(Body::empty()).unwrap();
    assert_eq!(call(&a, ok).await.0, StatusCode::OK);
    assert_eq!(call(&a, Request::get("/health").body(Body::empty()).unwrap()).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn full_server_says_429_and_a_gone_client_frees_its_slot() {
    let a = app(ServerConfig { port: 4, max_concurrency: 1, max_queue: 0, ..Default::default() });
    let stream = post("/v1/completions", r#"{"prompt": "hello", "max_tokens": 200, "stream": true, "temperature": 0}"#);
    let held = router(a.clone()).oneshot(stream).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let (s, v) = call(&a, post("/v1/completions", r#"{"prompt": "hi", "max_tokens": 2}"#)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_openai_error(&v);
    drop(held); // the client disconnects mid-stream
    let t0 = std::time::Instant::now();
    loop {
        let (s, _) = call(&a, post("/v1/completions", r#"{"prompt": "hi", "max_tokens": 2}"#)).await;
        if s == StatusCode::OK {
            break;
        }
        assert!(t0.elapsed().as_secs() < 10, "the slot was not freed after the client left");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_match_their_solo_results() {
    let a = app(ServerConfig { port: 5, max_concurrency: 4, ..Default::default() });
    let body = |i: usize| json!({"prompt": format!("hello {i} world"), "max_tokens": 24, "temperature": 0}).to_string();
    let mut solo = Vec::new();
    for i in 0..6 {
        solo.push(call(&a, post("/v1/completions", body(i))).await.1["choices"][0]["text"].clone());
    }
    let handles: Vec<_> = (0..6).map(|i| {
        let a = a.clone();
        tokio::spawn(async move { call(&a, post("/v1/completions", body(i))).await.1["choices"][0]["text"].clone() })
    }).collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), solo[i], "request {i} differs when run concurrently");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn fuzzed_bodies_get_well_formed_answers(cut in 0usize..120, flips in proptest::collection::vec((0usize..120, any::<u8>()), 0..4), chat: bool) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let a = app(ServerConfig { port: 6, ..Default::default() });
        let valid = if chat {
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"temperature":0.5,"stop":["x"],"seed":1,"top_p":0.9,"logprobs":true,"top_logprobs":2}"#
        } else {
            r#"{"prompt":"hello there","max_tokens":3,"temperature":0.5,"stop":"x","seed":1,"n":2,"logprobs":1,"presence_penalty":0.5}"#
        };
        let mut b = valid.as_bytes().to_vec();
        for (at, v) in flips { let i = at % b.len(); b[i] = v; }
        b.truncate(cut.max(1).min(b.len()));
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let (s, v) = rt.block_on(call(&a, post(path, b)));
        prop_assert!(s == StatusCode::OK || s == StatusCode::BAD_REQUEST, "status {} for body -> {}", s, v);
        if s == StatusCode::OK {
            prop_assert!(v["choices"].is_array() && v["usage"].is_object(), "{}", v);
        } else {
            prop_assert!(v["error"]["message"].is_string(), "{}", v);
        }
    }
}
