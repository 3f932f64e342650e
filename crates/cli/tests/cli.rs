//! The `augur` binary end to end: its JSON contract against the HF reference on the real model,
//! and clear errors (exit code 1, a message naming the problem, no panic) on bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use augur_models::{hub, tiny};
use serde_json::Value;

fn augur(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_augur")).args(args).output().expect("run augur")
}

fn real_model() -> String {
    match std::env::var("AUGUR_MODEL") {
        Ok(p) => p,
        Err(_) => hub::ensure_default_model().unwrap().display().to_string(),
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("augur-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got {:?}; stderr: {err}", out.status);
    assert!(err.contains(needle), "stderr should mention {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

#[test]
fn json_output_matches_the_hf_reference() {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/smollm2_ref.json")).unwrap()).unwrap();
    let model = real_model();
    // The default (integer activations: 16 or 22 bits by CPU; 2e-2 covers both) and f32.
    for ((flag, value), tol) in [(("--activations", "auto"), 2e-2), (("--activations", "f32"), 5e-3)] {
        for p in reference["prompts"].as_array().unwrap() {
            let ids: Vec<String> = p["prompt_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
            let out = augur(&["run", "-m", &model, flag, value, "--json", "--top-logits", "10", "--ignore-eos", "-n", "8", "--prompt-ids", &ids.join(",")]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let lines: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(lines.len(), 9, "8 tokens and a summary");
            for (k, line) in lines[..8].iter().enumerate() {
                assert_eq!(line["pos"], k);
                assert_eq!(line["token"], p["greedy_ids"][k]);
                let top: Vec<(u64, f64)> = line["top"].as_array().unwrap().iter().map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap())).collect();
                for want in p["positions"][k]["top10"].as_array().unwrap() {
                    let id = want[0].as_u64().unwrap();
                    let got = top.iter().find(|e| e.0 == id).unwrap_or_else(|| panic!("token {id} missing from augur's top-10"));
                    assert!((got.1 - want[1].as_f64().unwrap()).abs() < tol, "{value}: token {id}: {} vs HF {}", got.1, want[1]);
                }
            }
            let s = &lines[8]["summary"];
            assert_eq!(s["prompt_tokens"], p["n_prompt"]);
            assert_eq!(s["generated_tokens"], 8);
            assert!(s["prefill_tok_per_s"].as_f64().unwrap() > 0.0 && s["decode_tok_per_s"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn tiny_model_runs_chats_inspects_and_benches() {
    let dir = tmpdir("tiny");
    let (g, st) = tiny::write_both(&dir, true, 3).unwrap();
    let g = g.display().to_string();
    let out = augur(&["run", "-m", &g, "-n", "5", "--ignore-eos", "--temperature", "0.8", "--seed", "4", "hello"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = augur(&["run", "-m", &g, "-n", "5", "--ignore-eos", "--temperature", "0.8", "--seed", "4", "hello"]);
    assert_eq!(out.stdout, again.stdout, "same seed, same text");
    let out = augur(&["run", "-m", &st.display().to_string(), "--chat", "-n", "3", "--ignore-eos", "hi"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = augur(&["inspect", &g]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("blk.1.ffn_down.weight") && text.contains("tokenizer.ggml.model = \"gpt2\""), "{text}");
    let out = augur(&["bench", "-m", &g, "-p", "16", "-g", "4", "--runs", "2", "-t", "1"]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["prefill_tok_per_s"].as_f64().unwrap() > 0.0 && j["decode_tok_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(j["threads"], 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn spec_bench_dumps_each_tasks_token_ids() {
    let dir = tmpdir("specdump");
    let (g, _) = tiny::write_both(&dir, true, 7).unwrap();
    let tasks = dir.join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    let line = |text: &str| format!("{}\n", serde_json::json!({"messages": [{"role": "user", "content": text}]}));
    std::fs::write(tasks.join("grounded.jsonl"), line("copy this: a b c a b c a b c") + &line("hello hello hello")).unwrap();
    let dump = dir.join("tokens.jsonl");
    let out = augur(&[
        "spec-bench", "-m", &g.display().to_string(), "--tasks", &tasks.display().to_string(), "-n", "6", "-t", "1", "--json",
        "--dump", &dump.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(&dump).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "one line per task");
    for l in &lines {
        assert_eq!(l["group"], "grounded");
        assert!(!l["prompt"].as_array().unwrap().is_empty());
        let n = l["out"].as_array().unwrap().len();
        assert!((1..=6).contains(&n), "{n} tokens");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tmpdir("bad");
    let (g, _) = tiny::write_both(&dir, true, 5).unwrap();
    let gs = g.display().to_string();
    fails_with(&augur(&["run", "-m", &gs, "--prompt-ids", "1,999999"]), "999999");
    fails_with(&augur(&["run", "-m", &gs, "-n", "1000", "hello"]), "context");
    fails_with(&augur(&["run", "-m", &gs, "--temperature=-1", "hello"]), "temperature");
    fails_with(&augur(&["run", "-m", &gs]), "no prompt");
    fails_with(&augur(&["run", "-m", "/nonexistent/model.gguf", "hi"]), "/nonexistent/model.gguf");
    let bytes = std::fs::read(&g).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    fails_with(&augur(&["inspect", &cut.display().to_string()]), "truncated");
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a model at all").unwrap();
    fails_with(&augur(&["run", "-m", &junk.display().to_string(), "hi"]), "not a GGUF file");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_resume_and_run_a_checkpoint() {
    let dir = std::env::temp_dir().join(format!("augur-cli-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("text.txt");
    std::fs::write(&data, "a small corpus of text for a small model. ".repeat(200)).unwrap();
    let out = dir.join("ckpt");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let common = ["--config", "tiny", "--seq-len", "16", "--batch", "2", "--eval-every", "2", "--threads", "1"];
    let r = augur(&[&["train", "--data", d, "--steps", "4", "--out", o][..], &common[..]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("held-out loss"));
    let r = augur(&[&["train", "--data", d, "--steps", "6", "--resume", o][..], &common[..]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("step 6"));
    let r = augur(&["train", "--data", d, "--steps", "6", "--resume", o]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("already at step 6"));
    let r = augur(&["run", "-m", o, "-n", "5", "a small"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = augur(&["train", "--data", dir.join("missing").to_str().unwrap(), "--steps", "1"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("does not exist"));
    std::fs::remove_dir_all(&dir).ok();
}
