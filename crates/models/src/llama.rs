//! The Llama-family decoder: embedding, `n_layer` blocks of (RMSNorm → GQA attention with RoPE →
//! residual, RMSNorm → SwiGLU MLP → residual), final RMSNorm, output head (tied or separate).
//! Qwen2 adds q/k/v biases; Mistral is Llama. One definition serves GGUF and safetensors weights.

use std::time::Duration;

use augur_core::Tensor;
use augur_kernels::attention::{Mask, Shape};
use augur_kernels::actq::{ActQ, Format};
use augur_kernels::matmul::{actq_supported, matmul, matmul_actq, Matrix};
use augur_kernels::vec::{add_assign, rms_norm, rope, rope_angles, silu_mul};

use crate::state::State;
use crate::weight::Weight;
use crate::{Config, Error, Result};

/// Which positions of a forward pass produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring, speculative verification).
    All,
    /// None: the pass stops after the final norm, whose output for every token is then in
    /// [`State::hidden`] (training data for speculators, embeddings).
    Hidden,
}

/// Weights of one decoder block.
pub struct Layer {
    /// [dim]
    pub(crate) attn_norm: Vec<f32>,
    /// [n_head * head_dim, dim]
    pub(crate) wq: Weight,
    /// [n_kv_head * head_dim, dim]
    pub(crate) wk: Weight,
    /// [n_kv_head * head_dim, dim]
    pub(crate) wv: Weight,
    /// [dim, n_head * head_dim]
    pub(crate) wo: Weight,
    /// Optional q/k/v biases (Qwen2).
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    /// [dim]
    pub(crate) ffn_norm: Vec<f32>,
    /// [hidden, dim]
    pub(crate) w_gate: Weight,
    /// [hidden, dim]
    pub(crate) w_up: Weight,
    /// [dim, hidden]
    pub(crate) w_down: Weight,
}

/// A loaded Llama-family model (immutable; run state lives in [`State`]).
pub struct Llama {
    /// Hyperparameters.
    pub cfg: Config,
    /// [vocab, dim]
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    /// [dim]
    pub(crate) norm: Vec<f32>,
    /// [vocab, dim]; the embedding itself when tied.
    pub(crate) output: Weight,
    /// [head_dim / 2]
    pub(crate) inv_freq: Vec<f32>,
    /// Whether `output` is the embedding.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) tied: bool,
    /// The weights on a CUDA device, once [`Llama::to_device`] moved the forward pass there.
    #[cfg(feature = "cuda")]
    pub(crate) gpu: Option<std::sync::Arc<augur_cuda::GpuModel>>,
}

fn expect_shape(name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::Config(format!("tensor `{name}` has shape {:?}, the config implies {shape:?}", t.shape())));
    }
    Ok(())
}

impl Llama {
    /// Build from a tensor source keyed by GGUF names (`blk.0.attn_q.weight`, …).
    pub fn load(cfg: Config, get: impl Fn(&str) -> Result<Tensor>, has: impl Fn(&str) -> bool) -> Result<Self> {
        let (dim, hid) = (cfg.dim, cfg.hidden);
        let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        let mat = |name: &str, shape: [usize; 2]| -> Result<Tensor> {
            let t = get(name)?;
            expect_shape(name, &t, &shape)?;
            t.matrix()?;
            Ok(t)
        };
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = get(name)?;
            expect_shape(name, &t, &[n])?;
            Ok(t.to_vec_f32()?)
        };
        let opt_vec = |name: &str, n: usize| -> Result<Option<Vec<f32>>> { if has(name) { vec(name, n).map(Some) } else { Ok(None) } };
        let embed = mat("token_embd.weight", [cfg.vocab, dim])?;
        let tied = !has("output.weight");
        let output = Weight::new(if tied { embed.clone() } else { mat("output.weight", [cfg.vocab, dim])? });
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm.weight"), dim)?,
                wq: Weight::new(mat(&n("attn_q.weight"), [qd, dim])?),
                wk: Weight::new(mat(&n("attn_k.weight"), [kvd, dim])?),
                wv: Weight::new(mat(&n("attn_v.weight"), [kvd, dim])?),
                wo: Weight::new(mat(&n("attn_output.weight"), [dim, qd])?),
                bq: opt_vec(&n("attn_q.bias"), qd)?,
                bk: opt_vec(&n("attn_k.bias"), kvd)?,
                bv: opt_vec(&n("attn_v.bias"), kvd)?,
                ffn_norm: vec(&n("ffn_norm.weight"), dim)?,
                w_gate: Weight::new(mat(&n("ffn_gate.weight"), [hid, dim])?),
                w_up: Weight::new(mat(&n("ffn_up.weight"), [hid, dim])?),
                w_down: Weight::new(mat(&n("ffn_down.weight"), [dim, hid])?),
            });
        }
        let inv_freq = cfg.inv_freq();
        Ok(Llama {
            norm: vec("output_norm.weight", dim)?,
            cfg,
            embed,
            layers,
            output,
            inv_freq,
            tied,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// Run `tokens` at positions `state.len()..`, append their keys/values to the cache and return
    /// logits: `[vocab]` for [`Logits::Last`], `[tokens.len(), vocab]` for [`Logits::All`].
    pub fn forward<'s>(&self, st: &'s mut State, tokens: &[u32], which: Logits) -> Result<&'s [f32]> {
        self.run(st, tokens, None, self.layers.len(), which)
    }

    /// Score a token tree in one pass: node `i` sits at position `state.len() + depth[i]` and
    /// attends to the whole cache plus the nodes `j` with `ancestors[i * n + j]` (its ancestors
    /// and itself). Returns logits for every node; all nodes' keys/values are appended in node
    /// order (keep the accepted ones with [`State::keep`]).
    pub fn forward_tree<'s>(&self, st: &'s mut State, tokens: &[u32], depth: &[usize], ancestors: &[bool]) -> Result<&'s [f32]> {
        let n = tokens.len();
        if depth.len() != n || ancestors.len() != n * n {
            return Err(Error::Config(format!("forward_tree: {n} tokens need {n} depths and an {n}x{n} mask")));
        }
        // A chain (every node the child of the previous one, a single row included) is plain
        // causal attention, which has the faster kernel.
        let chain = (0..n).all(|i| (0..n).all(|j| ancestors[i * n + j] == (j <= i)));
        let tree = if chain { None } else { Some((depth, ancestors)) };
        self.run(st, tokens, tree, self.layers.len(), Logits::All)
    }

    /// The name of the CUDA device the forward pass runs on, if [`Llama::to_device`] moved it
    /// there (feature `cuda`); `None` on the CPU.
    pub fn device_name(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.device().name().to_string());
        }
        None
    }

    /// Greedy decoding with every step's argmax taken on the CUDA device, so that only token
    /// ids cross to the host (one persistent launch per step where the model fits it, else a
    /// replayed graph): `prompt` goes into `st`'s cache after what it holds, then up to
    /// `max_new` tokens are generated, each handed to `on_token`, which returns whether to go
    /// on. Returns the times of the prompt (first token included) and of the later tokens, or
    /// `None` on the CPU, where callers decode step by step. Afterwards the cache holds the
    /// prompt and every generated token but the last, as after step-by-step decoding.
    pub fn greedy_on_device(&self, st: &mut State, prompt: &[u32], max_new: usize, on_token: &mut dyn FnMut(u32) -> bool) -> Result<Option<(Duration, Duration)>> {
        self.check_input(prompt, st.pos + prompt.len() + max_new)?;
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return crate::cuda::greedy(gpu, st, prompt, max_new, on_token).map(Some);
        }
        let _ = (st, prompt, max_new, on_token);
        Ok(None)
    }

    /// The output head's rows `ids` (the logit weights of those tokens), as f32 `[ids.len(), dim]`:
    /// a drafter's reduced-vocabulary head, or a frozen head for training.
    pub fn output_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.rows_of(&self.output, ids)
    }

    /// The token embedding's rows `ids`, as f32 `[ids.len(), dim]` (a drafter's input, or a
    /// frozen embedding for training).
    pub fn embedding_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.rows_of(&self.embed, ids)
    }

    /// The final RMSNorm's weight, `[dim]`.
    pub fn output_norm(&self) -> &[f32] {
        &self.norm
    }

    /// `tokens` are all in the vocabulary and `need` positions fit the context.
    fn check_input(&self, tokens: &[u32], need: usize) -> Result<()> {
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(Error::UnknownToken { id, vocab: self.cfg.vocab });
        }
        if need > self.cfg.context {
            return Err(Error::ContextFull { need, ctx: self.cfg.context });
        }
        Ok(())
    }

    fn rows_of(&self, t: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
        let (m, dim) = (t.matrix()?, self.cfg.dim);
        let mut out = vec![0.0; ids.len() * dim];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim)) {
            if id as usize >= self.cfg.vocab {
                return Err(Error::UnknownToken { id, vocab: self.cfg.vocab });
            }
            m.row_f32(id as usize, row);
        }
        Ok(out)
    }

    /// Only the first `n_layers` blocks, then the final norm and output head (early-exit
    /// self-speculation). Keys/values of those layers are written at the new positions, as in a
    /// full pass; the other layers' caches are left as they were, and a full pass from an earlier
    /// position rewrites them.
    pub fn forward_early_exit<'s>(&self, st: &'s mut State, tokens: &[u32], n_layers: usize) -> Result<&'s [f32]> {
        if n_layers == 0 || n_layers > self.layers.len() {
            return Err(Error::Config(format!("early exit after {n_layers} layers: the model has {}", self.layers.len())));
        }
        self.run(st, tokens, None, n_layers, Logits::Last)
    }

    /// One decode step for several sequences at once (continuous batching): `tokens[i]` is
    /// appended to `seqs[i]`, whose own cache it attends to. The matmuls run once over all rows;
    /// `scratch` provides the buffers (its own cache is untouched). Returns `[n, vocab]` logits.
    /// Each row's numbers are exactly those of a single-sequence step.
    pub fn forward_many<'s>(&self, scratch: &'s mut State, seqs: &mut [&mut State], tokens: &[u32]) -> Result<&'s [f32]> {
        if seqs.len() != tokens.len() {
            return Err(Error::Config(format!("forward_many: {} sequences but {} tokens", seqs.len(), tokens.len())));
        }
        if let Some(s) = seqs.iter().find(|s| s.pos + 1 > self.cfg.context) {
            return Err(Error::ContextFull { need: s.pos + 1, ctx: self.cfg.context });
        }
        self.run_rows(scratch, Some(seqs), tokens, None, self.layers.len(), Logits::All)
    }

    fn run<'s>(
        &self,
        st: &'s mut State,
        tokens: &[u32],
        tree: Option<(&[usize], &[bool])>,
        n_layers: usize,
        which: Logits,
    ) -> Result<&'s [f32]> {
        self.run_rows(st, None, tokens, tree, n_layers, which)
    }

    /// The forward pass over `tokens`: of one sequence held in `st` (`seqs` None; a tree when
    /// `tree` is given), or one token per sequence of `seqs` with `st` as scratch.
    fn run_rows<'s>(
        &self,
        st: &'s mut State,
        mut seqs: Option<&mut [&mut State]>,
        tokens: &[u32],
        tree: Option<(&[usize], &[bool])>,
        n_layers: usize,
        which: Logits,
    ) -> Result<&'s [f32]> {
        let cfg = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Config("forward called with no tokens".into()));
        }
        let pos0 = st.pos;
        self.check_input(tokens, pos0 + n)?;
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return match seqs {
                Some(seqs) => crate::cuda::run_many(gpu, st, seqs, tokens, n_layers),
                None => crate::cuda::run(gpu, st, tokens, tree, n_layers, which),
            };
        }
        let n_logits = match which {
            Logits::Last => 1,
            Logits::All | Logits::Hidden => n,
        };
        st.fit(cfg, n, n_logits);
        if let Some((_, anc)) = tree {
            // [n, pos0 + n]: the cached prefix is visible to every node, then the tree mask.
            let seq = pos0 + n;
            st.mask.clear();
            for i in 0..n {
                st.mask.extend(std::iter::repeat_n(true, pos0));
                st.mask.extend_from_slice(&anc[i * n..(i + 1) * n]);
            }
            debug_assert_eq!(st.mask.len(), n * seq);
        }
        let (dim, hd, hid) = (cfg.dim, cfg.head_dim, cfg.hidden);
        let (qd, kvd) = (cfg.n_head * hd, cfg.n_kv_head * hd);
        let half = hd / 2;
        // The integer path serves decode and small batches (speculative verification), and long
        // prompts too where the weights are packed (`Quantized::chunked`); other long prompts
        // take the f32 gemm path, which is faster there than the GGUF-layout integer kernel.
        let fast = st.activations.format();
        match seqs.as_deref_mut() {
            None => st.match_kv(st.activations),
            Some(seqs) => seqs.iter_mut().for_each(|s| s.match_kv(st.activations)),
        }

        let embed = self.embed.matrix()?;
        for (t, &id) in tokens.iter().enumerate() {
            embed.row_f32(id as usize, &mut st.x[t * dim..(t + 1) * dim]);
        }
        for t in 0..n {
            let pos = match (&seqs, tree) {
                (Some(seqs), _) => seqs[t].pos,
                (None, Some((depth, _))) => pos0 + depth[t],
                (None, None) => pos0 + t,
            };
            rope_angles(pos, &self.inv_freq, &mut st.cs[t * half..(t + 1) * half]);
        }
        let shape = Shape { n_head: cfg.n_head, n_kv_head: cfg.n_kv_head, head_dim: hd };
        let scale = 1.0 / (hd as f32).sqrt();

        for (l, layer) in self.layers[..n_layers].iter().enumerate() {
            let x = &mut st.x[..n * dim];
            let xn = &mut st.xn[..n * dim];
            for (xr, or) in x.chunks_exact(dim).zip(xn.chunks_exact_mut(dim)) {
                rms_norm(xr, &layer.attn_norm, cfg.rms_eps, or);
            }
            let (q, k, v) = (&mut st.q[..n * qd], &mut st.k[..n * kvd], &mut st.v[..n * kvd]);
            Quantized::new(&mut st.actq, fast).linear_group(
                [(&layer.wq, &mut *q, layer.bq.as_deref()), (&layer.wk, &mut *k, layer.bk.as_deref()), (&layer.wv, &mut *v, layer.bv.as_deref())],
                xn,
                n,
            )?;
            for t in 0..n {
                let cs = &st.cs[t * half..(t + 1) * half];
                rope(&mut q[t * qd..(t + 1) * qd], hd, cs, cfg.rope_interleaved);
                rope(&mut k[t * kvd..(t + 1) * kvd], hd, cs, cfg.rope_interleaved);
            }
            let att = &mut st.att[..n * qd];
            match seqs.as_deref_mut() {
                None => {
                    let mask = if tree.is_some() { Mask::Explicit(&st.mask) } else { Mask::Causal { pos0 } };
                    st.kv[l].append_and_attend(pos0, k, v, q, shape, mask, scale, att);
                }
                Some(seqs) => {
                    for (t, s) in seqs.iter_mut().enumerate() {
                        let (kt, vt) = (&k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd]);
                        let (qt, at) = (&q[t * qd..(t + 1) * qd], &mut att[t * qd..(t + 1) * qd]);
                        s.kv[l].append_and_attend(s.pos, kt, vt, qt, shape, Mask::Causal { pos0: s.pos }, scale, at);
                    }
                }
            }
            let proj = &mut st.proj[..n * dim];
            Quantized::new(&mut st.actq, fast).linear(&layer.wo, att, n, proj, None)?;
            add_assign(x, proj);

            for (xr, or) in x.chunks_exact(dim).zip(xn.chunks_exact_mut(dim)) {
                rms_norm(xr, &layer.ffn_norm, cfg.rms_eps, or);
            }
            let (gate, up) = (&mut st.gate[..n * hid], &mut st.up[..n * hid]);
            Quantized::new(&mut st.actq, fast).linear_group([(&layer.w_gate, &mut *gate, None), (&layer.w_up, &mut *up, None)], xn, n)?;
            silu_mul(gate, up);
            Quantized::new(&mut st.actq, fast).linear(&layer.w_down, gate, n, proj, None)?;
            add_assign(x, proj);
        }
        match seqs {
            None => st.pos = pos0 + n,
            Some(seqs) => seqs.iter_mut().for_each(|s| s.pos += 1),
        }

        let first = n - n_logits;
        let xs = &st.x[first * dim..n * dim];
        let xn = &mut st.xn[..n_logits * dim];
        for (xr, or) in xs.chunks_exact(dim).zip(xn.chunks_exact_mut(dim)) {
            rms_norm(xr, &self.norm, cfg.rms_eps, or);
        }
        st.hidden_rows = n_logits;
        if which == Logits::Hidden {
            return Ok(&st.logits[..0]);
        }
        let logits = &mut st.logits[..n_logits * cfg.vocab];
        Quantized::new(&mut st.actq, fast).linear(&self.output, xn, n_logits, logits, None)?;
        Ok(logits)
    }
}

/// A weight, its output buffer and its optional bias.
type Projection<'a, 'b> = (&'a Weight, &'b mut [f32], Option<&'a [f32]>);

/// Projections that share one input: the input is quantized for the integer path at most once.
struct Quantized<'a> {
    actq: &'a mut [ActQ],
    /// The integer path's format, or `None` for f32 activations.
    fast: Option<Format>,
    ready: bool,
}

impl<'a> Quantized<'a> {
    fn new(actq: &'a mut [ActQ], fast: Option<Format>) -> Self {
        Quantized { actq, fast, ready: false }
    }

    /// Several projections of the same input in one parallel region when they all take the
    /// integer path (q/k/v, gate/up); otherwise one by one. Allocation-free.
    fn linear_group<const M: usize>(&mut self, outs: [Projection; M], x: &[f32], n: usize) -> Result<()> {
        let mut mats: [Option<Matrix>; M] = [None; M];
        for (slot, (w, _, _)) in mats.iter_mut().zip(outs.iter()) {
            *slot = Some(w.cpu_matrix()?);
        }
        let mats: [Matrix; M] = mats.map(|m| m.expect("filled above"));
        let k = mats[0].k;
        if n > self.actq.len() && self.can_chunk(&mats) {
            let biases: [Option<&[f32]>; M] = std::array::from_fn(|i| outs[i].2);
            let mut ys = outs.map(|(_, y, _)| y);
            self.chunked(&mats, &mut ys, x, n);
            for (y, b) in ys.iter_mut().zip(biases) {
                add_bias(y, b);
            }
            return Ok(());
        }
        let integer = self.fast.is_some() && n <= self.actq.len() && k.is_multiple_of(augur_kernels::actq::BLOCK) && mats.iter().all(|m| m.k == k && actq_supported(m));
        if !integer {
            for (w, y, b) in outs {
                self.linear(w, x, n, y, b)?;
            }
            return Ok(());
        }
        self.quantize(x, k);
        let biases: [Option<&[f32]>; M] = std::array::from_fn(|i| outs[i].2);
        let mut ys = outs.map(|(_, y, _)| y);
        let refs: [&Matrix; M] = std::array::from_fn(|i| &mats[i]);
        augur_kernels::matmul::matmul_actq_group(refs, &mut ys, &self.actq[..n]);
        for (y, b) in ys.iter_mut().zip(biases) {
            add_bias(y, b);
        }
        Ok(())
    }

    /// Whether [`Quantized::chunked`] takes these matrices: all packed, one row length, i16
    /// activations.
    fn can_chunk(&self, mats: &[Matrix]) -> bool {
        self.fast == Some(Format::Wide) && !self.actq.is_empty() && mats.iter().all(|m| m.packed.is_some() && m.k == mats[0].k)
    }

    /// Longer batches (prefill) on packed matrices: the integer kernel over chunks of as many
    /// tokens as there are activation buffers, so every pass reads the packed copy alone (the
    /// GGUF blocks stay untouched after packing) and a token's products do not depend on the
    /// batch it came in.
    fn chunked<const M: usize>(&mut self, mats: &[Matrix; M], ys: &mut [&mut [f32]; M], x: &[f32], n: usize) {
        let (k, c) = (mats[0].k, self.actq.len());
        let out: [augur_kernels::pool::SyncPtr<f32>; M] = std::array::from_fn(|i| augur_kernels::pool::SyncPtr::new(ys[i].as_mut_ptr()));
        let refs: [&Matrix; M] = std::array::from_fn(|i| &mats[i]);
        for t0 in (0..n).step_by(c) {
            let len = c.min(n - t0);
            for (a, xr) in self.actq.iter_mut().zip(x[t0 * k..(t0 + len) * k].chunks_exact(k)) {
                a.format = Format::Wide;
                a.quantize(xr);
            }
            // SAFETY: rows t0 .. t0 + len of output i (n rows of mats[i].rows values, borrowed
            // mutably by `ys` for this call); the chunks do not overlap.
            let mut parts: [&mut [f32]; M] = std::array::from_fn(|i| unsafe { out[i].slice(t0 * mats[i].rows, len * mats[i].rows) });
            augur_kernels::matmul::matmul_actq_group(refs, &mut parts, &self.actq[..len]);
        }
        // The buffers hold the last chunk now.
        self.ready = false;
    }

    fn quantize(&mut self, x: &[f32], k: usize) {
        if !self.ready {
            let format = self.fast.expect("quantize: only on the integer path");
            for (a, xr) in self.actq.iter_mut().zip(x.chunks_exact(k)) {
                a.format = format;
                a.quantize(xr);
            }
            self.ready = true;
        }
    }

    /// `y = x · Wᵀ (+ b)` for `n` rows; every call on one `Quantized` must pass the same `x`.
    fn linear(&mut self, w: &Weight, x: &[f32], n: usize, y: &mut [f32], bias: Option<&[f32]>) -> Result<()> {
        let m: Matrix = w.cpu_matrix()?;
        if n > self.actq.len() && self.can_chunk(&[m]) {
            self.chunked(&[m], &mut [&mut *y], x, n);
            add_bias(y, bias);
            return Ok(());
        }
        if self.fast.is_some() && n <= self.actq.len() && m.k.is_multiple_of(augur_kernels::actq::BLOCK) && actq_supported(&m) {
            self.quantize(x, m.k);
            matmul_actq(&m, &self.actq[..n], y);
            add_bias(y, bias);
            return Ok(());
        }
        linear(w, x, n, y, bias)
    }
}

fn add_bias(y: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            add_assign(row, b);
        }
    }
}

/// `y = x · Wᵀ (+ b)` for `n` rows, f32 activations.
fn linear(w: &Tensor, x: &[f32], n: usize, y: &mut [f32], bias: Option<&[f32]>) -> Result<()> {
    let m: Matrix = w.matrix()?;
    matmul(&m, x, n, y);
    add_bias(y, bias);
    Ok(())
}
