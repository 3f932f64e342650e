//! Self-distillation data (as Medusa-2 and EAGLE train): the target model's own responses to a
//! prompt set, so a speculator learns what *this* model says, not what some dataset says.
//!
//! A data directory holds `samples.jsonl` (one line per prompt: its group, the prompt's token
//! count and every token id of prompt + response) and, optionally, `hidden.safetensors` with
//! the target's final-norm hidden state of every token (`hidden`, bf16 `[Σ tokens, dim]`, the
//! samples' tokens concatenated in file order).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use augur_core::Tensor;
use augur_decode::chat::{ChatTemplate, Message};
use augur_decode::{GenerateConfig, SamplerConfig};
use augur_models::{Llama, Logits, Model, State};
use half::bf16;
use serde::{Deserialize, Serialize};

use crate::error::io;
use crate::{Error, Result};

/// A prompt read from a prompt file, rendered and tokenized.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The line's `group` (or the file's stem when absent).
    pub group: String,
    /// Token ids of the rendered prompt.
    pub ids: Vec<u32>,
}

/// Read a JSONL prompt file: each line `{"messages": [...]}` (rendered with the model's chat
/// template, generation prompt added) or `{"prompt": "raw text"}`, with an optional `group`.
/// Blank lines are skipped (a file of none gives no prompts); `limit` keeps the first N.
pub fn load_prompts(path: &Path, model: &Model, limit: Option<usize>) -> Result<Vec<Prompt>> {
    let tpl = ChatTemplate::for_model(model)?;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Invalid(format!("{}: not JSON ({e})", at())))?;
        let rendered = if let Some(m) = v.get("messages") {
            let msgs: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| Error::Invalid(format!("{}: `messages` must be a list of {{role, content}} ({e})", at())))?;
            tpl.render(&msgs, true)?
        } else if let Some(p) = v.get("prompt").and_then(|p| p.as_str()) {
            p.to_string()
        } else {
            return Err(Error::Invalid(format!("{}: a line needs `messages` or `prompt`", at())));
        };
        let group = v.get("group").and_then(|g| g.as_str()).map_or_else(|| stem.clone(), str::to_string);
        out.push(Prompt { group, ids: model.tokenizer.encode(&rendered)? });
    }
    Ok(out)
}

/// One prompt and the target's response to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The prompt's group (chat, code, …).
    pub group: String,
    /// How many of `ids` are the prompt.
    pub prompt_len: usize,
    /// Prompt then response token ids (the response ends with EOS unless cut by the budget).
    pub ids: Vec<u32>,
}

/// A loaded data directory.
#[derive(Debug, Clone)]
pub struct DistillSet {
    /// Prompts and responses.
    pub samples: Vec<Sample>,
    /// Hidden states of every token (see the module docs), when cached.
    pub hidden: Option<Vec<bf16>>,
    /// Width of the hidden states (0 when not cached).
    pub dim: usize,
}

const SAMPLES: &str = "samples.jsonl";
const HIDDEN: &str = "hidden.safetensors";

/// The target's response to each prompt (`max_tokens` at most, stopping at EOS), sampled as
/// `sampler` says (greedy by default). `progress(done, total)` is called after each prompt.
pub fn respond(model: &Model, prompts: &[Prompt], max_tokens: usize, sampler: SamplerConfig, mut progress: impl FnMut(usize, usize)) -> Result<Vec<Sample>> {
    let cfg = GenerateConfig { max_tokens, sampler, ids_only: true, ..Default::default() };
    let mut out = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let s = augur_decode::generate(model, &p.ids, &cfg, |_| ControlFlow::Continue(()))?;
        let mut ids = p.ids.clone();
        ids.extend_from_slice(&s.generated);
        out.push(Sample { group: p.group.clone(), prompt_len: p.ids.len(), ids });
        progress(i + 1, prompts.len());
    }
    Ok(out)
}

/// The target's final-norm hidden state of every token of every sample, `[Σ len, dim]` (one
/// prefill per sample). `progress(done, total)` is called after each sample.
pub fn hidden_states(llama: &Llama, samples: &[Sample], mut progress: impl FnMut(usize, usize)) -> Result<Vec<bf16>> {
    let dim = llama.cfg.dim;
    let mut out = Vec::with_capacity(samples.iter().map(|s| s.ids.len()).sum::<usize>() * dim);
    let mut st = State::new(&llama.cfg);
    for (i, s) in samples.iter().enumerate() {
        if s.ids.len() > llama.cfg.context {
            return Err(Error::Invalid(format!("sample {i} has {} tokens, past the model's context of {}", s.ids.len(), llama.cfg.context)));
        }
        st.truncate(0);
        llama.forward(&mut st, &s.ids, Logits::Hidden)?;
        out.extend(st.hidden().iter().map(|&v| bf16::from_f32(v)));
        progress(i + 1, samples.len());
    }
    Ok(out)
}

impl DistillSet {
    /// Write `samples.jsonl` (and `hidden.safetensors` when hidden states are present) into
    /// `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(SAMPLES);
        let tmp = dir.join(format!("{SAMPLES}.tmp"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io(&tmp))?);
        for s in &self.samples {
            let line = serde_json::to_string(s).map_err(|e| Error::Invalid(e.to_string()))?;
            writeln!(f, "{line}").map_err(io(&tmp))?;
        }
        f.into_inner().map_err(|e| Error::Io { path: tmp.clone(), err: e.into_error() })?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Some(h) = &self.hidden {
            let rows = h.len() / self.dim.max(1);
            let t = Tensor::from_bf16(h.clone(), &[rows, self.dim])?;
            augur_formats::safetensors::save(&dir.join(HIDDEN), &[("hidden", &t)])?;
        }
        Ok(())
    }

    /// Read a directory written by [`DistillSet::save`] (`augur distill-data`).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(SAMPLES);
        let text = std::fs::read_to_string(&path).map_err(|err| Error::Invalid(format!("{}: {err}; create the data with `augur distill-data --out {}`", path.display(), dir.display())))?;
        let mut samples = Vec::new();
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let s: Sample = serde_json::from_str(line).map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
            if s.prompt_len == 0 || s.prompt_len > s.ids.len() {
                return Err(Error::Invalid(format!("{}:{}: prompt_len {} does not fit {} tokens", path.display(), i + 1, s.prompt_len, s.ids.len())));
            }
            samples.push(s);
        }
        let (mut hidden, mut dim) = (None, 0);
        let hpath = dir.join(HIDDEN);
        if hpath.exists() {
            let ck = augur_formats::safetensors::Checkpoint::open(&hpath)?;
            let t = ck.get("hidden")?;
            let (rows, d) = t.dims2()?;
            let total: usize = samples.iter().map(|s| s.ids.len()).sum();
            if rows != total {
                return Err(Error::Invalid(format!("{}: {rows} hidden rows for {total} tokens in {SAMPLES}; re-run `augur distill-data`", hpath.display())));
            }
            let v = t.to_vec_f32()?;
            hidden = Some(v.into_iter().map(bf16::from_f32).collect());
            dim = d;
        }
        Ok(DistillSet { samples, hidden, dim })
    }

    /// Offset of each sample's first token in the concatenated token order.
    pub fn offsets(&self) -> Vec<usize> {
        let mut at = 0;
        self.samples
            .iter()
            .map(|s| {
                let o = at;
                at += s.ids.len();
                o
            })
            .collect()
    }
}
