//! Tokenizers built from a model's own files, through the `tokenizers` crate (HF's implementation,
//! so ids match the model's published tokenizer exactly).
//!
//! From GGUF metadata, augur writes the equivalent `tokenizer.json` document and loads that, so
//! GGUF and `tokenizer.json` share one code path:
//! - `gpt2` (byte-level BPE: SmolLM2, Llama 3, Qwen2): vocab + merges; the pre-tokenizer follows
//!   `tokenizer.ggml.pre` (`smollm` splits digits one by one before the GPT-2 regex, `llama-bpe`
//!   and `qwen2` use their own split regexes; unknown names fall back to GPT-2's with a warning).
//! - `llama` (SentencePiece BPE: Llama 2, Mistral): vocab + scores, merges derived from the scores
//!   (a merge ranks by the score of the token it forms), byte fallback, `▁` for spaces.
//!
//! Control and user-defined tokens become added tokens, matched whole in the input text.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value as Json};

use crate::gguf::{Gguf, Value};
use crate::{Error, Result};

const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A model's tokenizer and its special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// Tokens that end generation (EOS, and end-of-turn tokens where the model defines them).
    pub eos: Vec<u32>,
    /// Whether a BOS token is prepended to prompts.
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab {}, bos {:?}, eos {:?})", self.vocab_size(), self.bos, self.eos)
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn byte_level_pre(pre: &str) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        "gpt2" | "gpt-2" | "default" | "" => json!({"type": "Sequence", "pretokenizers": [split(GPT2_SPLIT), byte_level(false)]}),
        other => {
            eprintln!("augur: warning: pre-tokenizer `{other}` is not known to augur; using GPT-2's split rules (ids may differ from the model's own tokenizer)");
            byte_level_pre("gpt2")
        }
    }
}

/// SentencePiece-BPE merges from scores: every split of a token into two vocab tokens is a merge,
/// ranked by the score of the token it forms (higher first), ties by the pieces' ids.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (tok, &score) in tokens.iter().zip(scores) {
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                merges.push((score, il, ir, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect()
}

/// A metadata array of strings.
fn string_array(g: &Gguf, key: &str) -> Result<Vec<String>> {
    g.get_array(key)?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| Error::Metadata { key: key.into(), msg: "expected an array of strings".into() })
}

impl Tokenizer {
    /// Build the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(_, v)) => v.iter().map(|x| x.as_i64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let id = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<Json> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED)
            .map(|(i, (t, &ty))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": ty == TOKEN_CONTROL})
            })
            .collect();
        let doc = match model {
            "gpt2" => {
                let merges = string_array(g, "tokenizer.ggml.merges")?;
                let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
                json!({
                    "version": "1.0",
                    "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": byte_level_pre(pre),
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                              "vocab": vocab, "merges": merges},
                })
            }
            "llama" => {
                let scores: Vec<f32> = match g.get("tokenizer.ggml.scores") {
                    Some(Value::Array(_, v)) => v.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect(),
                    _ => vec![0.0; tokens.len()],
                };
                let merges = merges_from_scores(&tokens, &scores);
                let unk = id("tokenizer.ggml.unknown_token_id").map(|i| tokens[i as usize].clone());
                let add_space = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
                let mut norm = vec![];
                if add_space {
                    norm.push(json!({"type": "Prepend", "prepend": "▁"}));
                }
                norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
                let mut dec = vec![json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
                if add_space {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                json!({
                    "version": "1.0",
                    "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": norm},
                    "pre_tokenizer": null,
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": dec},
                    "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                              "vocab": vocab, "merges": merges.iter().map(|(a, b)| vec![a, b]).collect::<Vec<_>>()},
                })
            }
            other => {
                return Err(Error::Metadata {
                    key: "tokenizer.ggml.model".into(),
                    msg: format!("tokenizer type `{other}` is not supported (augur reads `gpt2` and `llama`)"),
                })
            }
        };
        let inner = tokenizers::Tokenizer::from_str(&doc.to_string()).map_err(tok_err)?;
        let bos = id("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id").filter(|e| !eos.contains(e)) {
            eos.push(e);
        }
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(model == "llama");
        Ok(Tokenizer { inner, bos, eos, add_bos })
    }

    /// Load `tokenizer.json` (and special ids from `tokenizer_config.json` / `config.json` beside it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let read = |name: &str| -> Option<Json> { serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok() };
        let tcfg = read("tokenizer_config.json");
        let cfg = read("config.json");
        let token_id = |v: Option<&Json>| -> Option<u32> {
            match v? {
                Json::String(s) => inner.token_to_id(s),
                Json::Object(o) => inner.token_to_id(o.get("content")?.as_str()?),
                _ => None,
            }
        };
        let cfg_ids = |key: &str| -> Vec<u32> {
            match cfg.as_ref().and_then(|c| c.get(key)) {
                Some(Json::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
                Some(Json::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
                _ => vec![],
            }
        };
        let tc = |k: &str| tcfg.as_ref().and_then(|t| t.get(k));
        let bos = token_id(tc("bos_token")).or_else(|| cfg_ids("bos_token_id").first().copied());
        let mut eos: Vec<u32> = token_id(tc("eos_token")).into_iter().collect();
        for e in cfg_ids("eos_token_id") {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let add_bos = tc("add_bos_token").and_then(Json::as_bool).unwrap_or(false);
        Ok(Tokenizer { inner, bos, eos, add_bos })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) are matched
    /// whole, as HF tokenizers do; BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// An error naming the first id outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size();
        match ids.iter().find(|&&i| i as usize >= n) {
            Some(bad) => Err(Error::Tokenizer(format!("token id {bad} is outside the vocabulary (0..{n})"))),
            None => Ok(()),
        }
    }

    /// The equivalent `tokenizer.json` document.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err)
    }

    /// Number of tokens (including added special tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of token string `s`.
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The token string of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}

/// Turns a growing id sequence into text pieces, emitting only complete UTF-8 characters (a
/// byte-level token may hold part of a character).
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Text already emitted corresponds to `ids[..emitted_ids]`, whose decoding is `emitted_text`.
    prefix: usize,
    emitted_len: usize,
}

impl StreamDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        StreamDecoder { ids: Vec::new(), prefix: 0, emitted_len: 0 }
    }

    /// Add a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids[self.prefix..])?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted_len {
            return Ok(String::new());
        }
        let new = text[self.emitted_len..].to_string();
        // Keep a short window so decoding stays O(1) per token: restart the window at this token
        // once the text is settled.
        if self.ids.len() - self.prefix > 8 {
            self.prefix = self.ids.len() - 1;
            self.emitted_len = tok.decode(&self.ids[self.prefix..])?.len();
        } else {
            self.emitted_len = text.len();
        }
        Ok(new)
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}
