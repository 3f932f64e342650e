//! The Llama forward pass on the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use augur_kernels::matmul::Matrix;
use cudarc::driver::sys::CUgraphInstantiate_flags;
use cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
use cudarc::driver::CudaGraph;

use crate::device::{Buf, Device, MATVEC_SMEM};
use crate::mega::{DLayer, DModel, Persistent};
use crate::ops::{DevMat, Input, ATT_SPAN};
use crate::{Error, Result};

/// Hyperparameters the device pass needs.
#[derive(Debug, Clone)]
pub struct Dims {
    /// Model width.
    pub dim: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// Decoder blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Positions the KV cache holds.
    pub context: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE pairs `(2i, 2i+1)` rather than `(i, i + head_dim/2)`.
    pub rope_interleaved: bool,
}

/// One decoder block's weights, borrowed from the host model for upload.
pub struct LayerWeights<'a> {
    /// `[dim]`
    pub attn_norm: &'a [f32],
    /// `[n_head * head_dim, dim]`
    pub wq: Matrix<'a>,
    /// `[n_kv_head * head_dim, dim]`
    pub wk: Matrix<'a>,
    /// `[n_kv_head * head_dim, dim]`
    pub wv: Matrix<'a>,
    /// `[dim, n_head * head_dim]`
    pub wo: Matrix<'a>,
    /// q/k/v biases (Qwen2).
    pub bias: [Option<&'a [f32]>; 3],
    /// `[dim]`
    pub ffn_norm: &'a [f32],
    /// `[hidden, dim]`
    pub w_gate: Matrix<'a>,
    /// `[hidden, dim]`
    pub w_up: Matrix<'a>,
    /// `[dim, hidden]`
    pub w_down: Matrix<'a>,
}

struct GpuLayer {
    attn_norm: Buf<f32>,
    wq: DevMat,
    wk: DevMat,
    wv: DevMat,
    wo: DevMat,
    bias: [Option<Buf<f32>>; 3],
    ffn_norm: Buf<f32>,
    w_gate: DevMat,
    w_up: DevMat,
    w_down: DevMat,
}

/// A Llama-family model with its weights on the device.
pub struct GpuModel {
    dev: Arc<Device>,
    /// Hyperparameters.
    pub dims: Dims,
    embed: DevMat,
    layers: Vec<GpuLayer>,
    norm: Buf<f32>,
    /// `None` when tied to the embedding.
    output: Option<DevMat>,
    /// RoPE `(cos, sin)` for every position and frequency, `[context, head_dim / 2, 2]`.
    rope: Buf<f32>,
}

/// What a pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// The last token's logits.
    Last,
    /// Every token's logits.
    All,
    /// Every token's final-norm hidden state.
    Hidden,
}

/// One forward pass over `tokens`, appended to the cache at rows `pos0..`.
pub struct Pass<'a> {
    /// Token ids (checked against the vocabulary by the caller).
    pub tokens: &'a [u32],
    /// Cached positions before the pass.
    pub pos0: usize,
    /// A token tree: each node's depth (its position is `pos0 + depth`) and the `[n, pos0 + n]`
    /// visibility mask. `None`: a causal chain.
    pub tree: Option<(&'a [usize], &'a [bool])>,
    /// Run only the first `n_layers` blocks (early exit); the model's count for a full pass.
    pub n_layers: usize,
    /// What to return.
    pub out: Out,
}

/// Tokens per chunk of a long causal pass (bounds the scratch memory).
const CHUNK: usize = 256;

/// One sequence's device state: KV cache and scratch.
pub struct GpuSeq {
    dev: Arc<Device>,
    kc: Vec<Buf<f32>>,
    vc: Vec<Buf<f32>>,
    cap: usize,
    x: Buf<f32>,
    xn: Buf<f32>,
    q: Buf<f32>,
    k: Buf<f32>,
    v: Buf<f32>,
    att: Buf<f32>,
    gate: Buf<f32>,
    up: Buf<f32>,
    logits: Buf<f32>,
    po: Buf<f32>,
    pml: Buf<f32>,
    /// Per query and head: attention splits done (zero between passes).
    counters: Buf<i32>,
    ids: Buf<i32>,
    meta: Buf<i32>,
    mask: Buf<u8>,
    keep: Buf<i32>,
    kvd: usize,
    /// A failed [`GpuSeq::keep`], reported by the next pass.
    failed: Option<String>,
    graph: Option<Graph>,
    /// State of the persistent decode step, made at its first use.
    persistent: Option<Persistent>,
    /// Host staging for `meta` and the mask.
    meta_host: Vec<i32>,
    mask_host: Vec<u8>,
}

impl std::fmt::Debug for GpuSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuSeq {{ layers: {}, cap: {}, graph: {} }}", self.kc.len(), self.cap, self.graph.is_some())
    }
}

/// A captured decode step.
struct Graph(CudaGraph);

// SAFETY: CUDA graphs may be used from any thread as long as calls on one graph are serialized;
// a `Graph` is owned by one `GpuSeq` and used only through `&mut GpuSeq`.
unsafe impl Send for Graph {}

/// How [`GpuModel::greedy`] runs its decode steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// One captured step (about 150 launches) replayed as a CUDA graph.
    Graph,
    /// One persistent launch per step (`decode.cu`): every block resident, the phases separated
    /// by grid-wide barriers; several steps queued before the host reads their ids.
    Persistent,
}

/// Steps the persistent decoder queues before reading their ids back (the steps past a stop
/// are computed and discarded).
const QUEUED_STEPS: usize = 8;

/// Timings of [`GpuModel::greedy`].
#[derive(Debug, Clone, Default)]
pub struct GreedyRun {
    /// Generated ids (the stopping token included).
    pub tokens: Vec<u32>,
    /// Prompt pass, first token included.
    pub prefill: Duration,
    /// Every later token.
    pub decode: Duration,
}

impl GpuModel {
    /// Upload a model: `embed` `[vocab, dim]`, the blocks, the final norm, the output head
    /// (`None` when tied) and RoPE's inverse frequencies.
    pub fn upload<'a>(
        dev: &Arc<Device>,
        dims: Dims,
        embed: Matrix,
        layers: impl IntoIterator<Item = LayerWeights<'a>>,
        norm: &[f32],
        output: Option<Matrix>,
        inv_freq: &[f32],
    ) -> Result<Self> {
        let mut gl = Vec::with_capacity(dims.n_layer);
        for l in layers {
            let bias = l.bias.map(|b| b.map(|b| dev.upload(b)));
            let [b0, b1, b2] = bias;
            gl.push(GpuLayer {
                attn_norm: dev.upload(l.attn_norm)?,
                wq: dev.upload_matrix(&l.wq)?,
                wk: dev.upload_matrix(&l.wk)?,
                wv: dev.upload_matrix(&l.wv)?,
                wo: dev.upload_matrix(&l.wo)?,
                bias: [b0.transpose()?, b1.transpose()?, b2.transpose()?],
                ffn_norm: dev.upload(l.ffn_norm)?,
                w_gate: dev.upload_matrix(&l.w_gate)?,
                w_up: dev.upload_matrix(&l.w_up)?,
                w_down: dev.upload_matrix(&l.w_down)?,
            });
        }
        if gl.len() != dims.n_layer {
            return Err(Error::Unsupported(format!("{} blocks given for a model of {}", gl.len(), dims.n_layer)));
        }
        let output = output.map(|m| dev.upload_matrix(&m)).transpose()?;
        // The angles as the CPU backend takes them: the f32 product, then cos/sin in f64.
        let mut table = Vec::with_capacity(dims.context * inv_freq.len() * 2);
        for pos in 0..dims.context {
            for &f in inv_freq {
                let a = (pos as f32 * f) as f64;
                table.extend([a.cos() as f32, a.sin() as f32]);
            }
        }
        Ok(GpuModel {
            embed: dev.upload_matrix(&embed)?,
            layers: gl,
            norm: dev.upload(norm)?,
            output,
            rope: dev.upload(&table)?,
            dev: dev.clone(),
            dims,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// An empty sequence (KV cache for the whole context) on this model's device.
    pub fn new_seq(&self) -> Result<GpuSeq> {
        let d = &self.dims;
        let kvd = d.n_kv_head * d.head_dim;
        let dev = &self.dev;
        let (mut kc, mut vc) = (Vec::new(), Vec::new());
        for _ in 0..d.n_layer {
            kc.push(dev.alloc(d.context * kvd)?);
            vc.push(dev.alloc(d.context * kvd)?);
        }
        let mut s = GpuSeq {
            dev: dev.clone(),
            kc,
            vc,
            cap: 0,
            x: dev.alloc(1)?,
            xn: dev.alloc(1)?,
            q: dev.alloc(1)?,
            k: dev.alloc(1)?,
            v: dev.alloc(1)?,
            att: dev.alloc(1)?,
            gate: dev.alloc(1)?,
            up: dev.alloc(1)?,
            logits: dev.alloc(1)?,
            po: dev.alloc(1)?,
            pml: dev.alloc(1)?,
            counters: dev.alloc(1)?,
            ids: dev.alloc(1)?,
            meta: dev.alloc(1)?,
            mask: dev.alloc(1)?,
            keep: dev.alloc(1)?,
            kvd,
            failed: None,
            graph: None,
            persistent: None,
            meta_host: Vec::new(),
            mask_host: Vec::new(),
        };
        self.fit(&mut s, 1)?;
        Ok(s)
    }

    fn nsplit_max(&self) -> usize {
        self.dims.context.div_ceil(ATT_SPAN)
    }

    /// Grow `s`'s scratch to `n` tokens. Buffers keep their addresses until they grow, which
    /// drops the captured decode graph.
    fn fit(&self, s: &mut GpuSeq, n: usize) -> Result<()> {
        if n <= s.cap {
            return Ok(());
        }
        let d = &self.dims;
        let dev = &self.dev;
        let qd = d.n_head * d.head_dim;
        s.graph = None;
        s.x = dev.alloc(n * d.dim)?;
        s.xn = dev.alloc(n * d.dim)?;
        s.q = dev.alloc(n * qd)?;
        s.k = dev.alloc(n * d.n_kv_head * d.head_dim)?;
        s.v = dev.alloc(n * d.n_kv_head * d.head_dim)?;
        s.att = dev.alloc(n * qd)?;
        s.gate = dev.alloc(n * d.hidden)?;
        s.up = dev.alloc(n * d.hidden)?;
        s.logits = dev.alloc(n * d.vocab)?;
        s.po = dev.alloc(n * d.n_head * self.nsplit_max() * d.head_dim)?;
        s.pml = dev.alloc(n * d.n_head * self.nsplit_max() * 2)?;
        s.counters = dev.alloc(n * d.n_head)?;
        s.ids = dev.alloc(n)?;
        s.meta = dev.alloc(n + 1)?;
        s.keep = dev.alloc(n)?;
        s.cap = n;
        Ok(())
    }

    /// Run `pass`. The final-norm hidden states of the output rows (`[n_out, dim]`: the last
    /// token for [`Out::Last`], every token otherwise) go to `hidden`, and their logits
    /// (`[n_out, vocab]`, none for [`Out::Hidden`]) to `logits`.
    pub fn forward(&self, s: &mut GpuSeq, pass: &Pass, logits: &mut [f32], hidden: &mut [f32]) -> Result<()> {
        if let Some(e) = s.failed.take() {
            return Err(Error::Unsupported(format!("an earlier cache update on the device failed: {e}")));
        }
        let n = pass.tokens.len();
        let d = &self.dims;
        if n == 0 || pass.pos0 + n > d.context || pass.n_layers == 0 || pass.n_layers > d.n_layer {
            return Err(Error::Unsupported(format!("a pass of {n} tokens at {} over {} layers does not fit this model", pass.pos0, pass.n_layers)));
        }
        let n_out = if pass.out == Out::Last { 1 } else { n };
        let vocab = if pass.out == Out::Hidden { 0 } else { d.vocab };
        if logits.len() < n_out * vocab || hidden.len() < n_out * d.dim {
            return Err(Error::Unsupported(format!("output buffers of {} and {} floats for {n_out} rows", logits.len(), hidden.len())));
        }
        if pass.tree.is_some() || n <= CHUNK {
            return self.run(s, pass, Some((&mut logits[..n_out * vocab], &mut hidden[..n_out * d.dim])));
        }
        // Long causal passes run in chunks, each returning its share of the outputs.
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK).min(n);
            let chunk = Pass { tokens: &pass.tokens[start..end], pos0: pass.pos0 + start, tree: None, n_layers: pass.n_layers, out: pass.out };
            let outs = match pass.out {
                Out::Last if end < n => None,
                Out::Last => Some((&mut logits[..vocab], &mut hidden[..d.dim])),
                _ => Some((&mut logits[start * vocab..end * vocab], &mut hidden[start * d.dim..end * d.dim])),
            };
            self.run(s, &chunk, outs)?;
        }
        Ok(())
    }

    fn run(&self, s: &mut GpuSeq, pass: &Pass, outs: Option<(&mut [f32], &mut [f32])>) -> Result<()> {
        let n = pass.tokens.len();
        let d = &self.dims;
        self.fit(s, n)?;
        s.meta_host.clear();
        s.meta_host.push(pass.pos0 as i32);
        match pass.tree {
            Some((depth, _)) => s.meta_host.extend(depth.iter().map(|&dp| (pass.pos0 + dp) as i32)),
            None => s.meta_host.extend((0..n).map(|t| (pass.pos0 + t) as i32)),
        }
        let ids: Vec<i32> = pass.tokens.iter().map(|&t| t as i32).collect();
        self.dev.write(&mut s.meta, &s.meta_host)?;
        self.dev.write(&mut s.ids, &ids)?;
        if let Some((_, mask)) = pass.tree {
            s.mask_host.clear();
            s.mask_host.extend(mask.iter().map(|&b| b as u8));
            if s.mask.len() < s.mask_host.len() {
                s.mask = self.dev.alloc(s.mask_host.len())?;
            }
            self.dev.write(&mut s.mask, &s.mask_host)?;
        }
        let nsplit = (pass.pos0 + n).div_ceil(ATT_SPAN);
        // SAFETY: every buffer was sized by `fit` for n tokens, the caches for the context.
        unsafe {
            self.encode(s, n, pass.tree.is_some(), pass.n_layers, nsplit)?;
            if let Some((logits, hidden)) = outs {
                let n_out = hidden.len() / d.dim;
                let xrow = s.x.at((n - n_out) * d.dim);
                if logits.is_empty() {
                    self.dev.rms_norm(xrow, self.norm.ptr, d.rms_eps, d.dim, n_out, s.xn.ptr)?;
                } else {
                    self.head(s, xrow, n_out)?;
                    self.dev.read(&s.logits, logits)?;
                }
                self.dev.read(&s.xn, hidden)?;
            }
        }
        self.dev.synchronize()
    }

    /// Logits of `rows` rows of the residual stream at `x` into `s.logits`.
    unsafe fn head(&self, s: &GpuSeq, x: u64, rows: usize) -> Result<()> {
        let d = &self.dims;
        // Normalised once: the head's many blocks then only copy their input.
        let head = self.output.as_ref().unwrap_or(&self.embed);
        self.dev.rms_norm(x, self.norm.ptr, d.rms_eps, d.dim, rows, s.xn.ptr)?;
        if Device::matvec_fits(rows, d.dim) {
            self.dev.matvec(&[(head, s.logits.ptr, None)], s.xn.ptr, rows, Input::Plain, false)
        } else {
            self.dev.matmul(head, s.xn.ptr, s.logits.ptr, None, rows, false)
        }
    }

    /// Queue the blocks for the `n` tokens in `s.ids` at `s.meta`; the residual stream ends in
    /// `s.x`. Launch shapes depend only on the arguments, so one decode step can be captured.
    unsafe fn encode(&self, s: &GpuSeq, n: usize, masked: bool, n_layers: usize, nsplit: usize) -> Result<()> {
        let d = &self.dims;
        let dev = &self.dev;
        let qd = d.n_head * d.head_dim;
        let shape = [d.n_head, d.n_kv_head, d.head_dim];
        dev.embed(&self.embed, s.ids.ptr, n, s.x.ptr)?;
        for (l, w) in self.layers[..n_layers].iter().enumerate() {
            let bias = |i: usize| w.bias[i].as_ref().map(|b| b.ptr);
            let same = w.wq.ty == w.wk.ty && w.wk.ty == w.wv.ty;
            if same && Device::matvec_fits(n, d.dim) {
                let segs = [(&w.wq, bias(0)), (&w.wk, bias(1)), (&w.wv, bias(2))];
                let kv = (s.kc[l].ptr, s.vc[l].ptr);
                dev.qkv_rope(segs, s.x.ptr, n, (w.attn_norm.ptr, d.rms_eps), s.q.ptr, kv, s.meta.ptr, self.rope.ptr, d.head_dim, d.rope_interleaved)?;
            } else {
                let qkv = [(&w.wq, s.q.ptr, bias(0)), (&w.wk, s.k.ptr, bias(1)), (&w.wv, s.v.ptr, bias(2))];
                self.project(s, &qkv, s.x.ptr, n, w.attn_norm.ptr)?;
                dev.rope_kv(s.q.ptr, s.k.ptr, s.v.ptr, s.kc[l].ptr, s.vc[l].ptr, s.meta.ptr, n, shape, self.rope.ptr, d.rope_interleaved)?;
            }
            let mask = masked.then_some(s.mask.ptr);
            dev.attention(s.q.ptr, s.kc[l].ptr, s.vc[l].ptr, s.meta.ptr, n, shape, mask, nsplit, s.po.ptr, s.pml.ptr, s.counters.ptr, s.att.ptr)?;
            if Device::matvec_fits(n, qd) {
                dev.matvec(&[(&w.wo, s.x.ptr, None)], s.att.ptr, n, Input::Plain, true)?;
            } else {
                dev.matmul(&w.wo, s.att.ptr, s.x.ptr, None, n, true)?;
            }
            self.project(s, &[(&w.w_gate, s.gate.ptr, None), (&w.w_up, s.up.ptr, None)], s.x.ptr, n, w.ffn_norm.ptr)?;
            if Device::matvec_fits(n, d.hidden) {
                dev.matvec(&[(&w.w_down, s.x.ptr, None)], s.gate.ptr, n, Input::SiluMul { up: s.up.ptr }, true)?;
            } else {
                dev.silu_mul(s.gate.ptr, s.up.ptr, n * d.hidden)?;
                dev.matmul(&w.w_down, s.gate.ptr, s.x.ptr, None, n, true)?;
            }
        }
        Ok(())
    }

    /// Projections of RMSNorm(x) with weight `norm`: fused into one matrix-vector launch per
    /// run of same-typed matrices when the batch is small, else normalised once and tiled.
    unsafe fn project(&self, s: &GpuSeq, segs: &[(&DevMat, u64, Option<u64>)], x: u64, n: usize, norm: u64) -> Result<()> {
        let d = &self.dims;
        if Device::matvec_fits(n, d.dim) {
            let input = Input::Norm { w: norm, eps: d.rms_eps };
            let mut start = 0;
            while start < segs.len() {
                let ty = segs[start].0.ty;
                let end = (start..segs.len()).find(|&i| segs[i].0.ty != ty).unwrap_or(segs.len());
                self.dev.matvec(&segs[start..end], x, n, input, false)?;
                start = end;
            }
            return Ok(());
        }
        self.dev.rms_norm(x, norm, d.rms_eps, d.dim, n, s.xn.ptr)?;
        for (m, y, b) in segs {
            self.dev.matmul(m, s.xn.ptr, *y, *b, n, false)?;
        }
        Ok(())
    }

    /// The decoder [`GpuModel::greedy`] uses: the persistent step where the model fits it
    /// (`AUGUR_CUDA_DECODER=graph` asks for the graph).
    pub fn decoder(&self) -> Decoder {
        if self.persistent_fits() && std::env::var("AUGUR_CUDA_DECODER").map_or(true, |v| v != "graph") {
            Decoder::Persistent
        } else {
            Decoder::Graph
        }
    }

    /// Whether the persistent step handles this model's shapes (its attention takes head_dim a
    /// multiple of 32 up to 256; its inputs and a norm's weights live in shared memory).
    fn persistent_fits(&self) -> bool {
        let d = &self.dims;
        d.head_dim % 32 == 0 && d.head_dim <= 256 && d.n_head % d.n_kv_head == 0 && (self.width() + d.dim) * 4 <= MATVEC_SMEM
    }

    /// The widest input of a block's projections.
    fn width(&self) -> usize {
        let d = &self.dims;
        d.dim.max(d.hidden).max(d.n_head * d.head_dim)
    }

    /// Greedy decoding on the device with [`GpuModel::decoder`]'s decoder.
    pub fn greedy(&self, s: &mut GpuSeq, prompt: &[u32], max_new: usize, on_token: impl FnMut(u32) -> bool) -> Result<GreedyRun> {
        self.greedy_with(self.decoder(), s, 0, prompt, max_new, on_token)
    }

    /// Greedy decoding on the device: the prompt pass, then decode steps that keep the argmax
    /// on the device, so only token ids cross to the host. The prompt goes into the cache at
    /// rows `pos0..` (the rows before hold an earlier part of the same sequence). `on_token`
    /// sees each id and returns whether to go on; at most `max_new` tokens. The cache then holds
    /// the prompt and every generated token but the last (and, past them, rows of steps queued
    /// beyond a stop, which later passes overwrite).
    pub fn greedy_with(&self, decoder: Decoder, s: &mut GpuSeq, pos0: usize, prompt: &[u32], max_new: usize, mut on_token: impl FnMut(u32) -> bool) -> Result<GreedyRun> {
        let d = &self.dims;
        if prompt.is_empty() || pos0 + prompt.len() + max_new > d.context {
            return Err(Error::Unsupported(format!("{pos0} cached + {} prompt tokens + {max_new} new do not fit a context of {}", prompt.len(), d.context)));
        }
        if decoder == Decoder::Persistent && !self.persistent_fits() {
            return Err(Error::Unsupported(format!("the persistent decode step takes head_dim a multiple of 32 up to 256 and inputs of at most {} floats", MATVEC_SMEM / 4)));
        }
        let t0 = Instant::now();
        let mut run = GreedyRun::default();
        // The prompt, in chunks, all but its last token's logits skipped.
        let split = prompt.len() - 1;
        for start in (0..split).step_by(CHUNK) {
            let toks = &prompt[start..(start + CHUNK).min(split)];
            self.run(s, &Pass { tokens: toks, pos0: pos0 + start, tree: None, n_layers: d.n_layer, out: Out::Last }, None)?;
        }
        self.fit(s, 1)?;
        let mut emit = |tok: i32| -> Result<bool> {
            if tok < 0 || tok as usize >= d.vocab {
                return Err(Error::Unsupported(format!("the device's argmax gave token {tok} (non-finite logits?)")));
            }
            if run.tokens.is_empty() {
                run.prefill = t0.elapsed();
            }
            run.tokens.push(tok as u32);
            Ok(on_token(tok as u32))
        };
        match decoder {
            Decoder::Graph => self.decode_graph(s, prompt[split], pos0 + split, max_new, &mut emit)?,
            Decoder::Persistent => self.decode_persistent(s, prompt[split], pos0 + split, max_new, &mut emit)?,
        }
        run.decode = t0.elapsed() - run.prefill;
        Ok(run)
    }

    /// Decode steps from token `first` at position `pos`, one captured step replayed per token.
    fn decode_graph(&self, s: &mut GpuSeq, first: u32, mut pos: usize, max_new: usize, emit: &mut dyn FnMut(i32) -> Result<bool>) -> Result<()> {
        let dev = &self.dev;
        let mut id = [first as i32];
        dev.write(&mut s.ids, &id)?;
        let nsplit = self.nsplit_max();
        for _ in 0..max_new {
            dev.write(&mut s.meta, &[pos as i32, pos as i32])?;
            if s.graph.is_none() {
                dev.stream.begin_capture(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                // SAFETY: scratch fitted for one token, the caches for the whole context.
                let queued = unsafe { self.step(s, nsplit) };
                let graph = dev.stream.end_capture(CUgraphInstantiate_flags(0));
                queued?;
                s.graph = graph?.map(Graph);
            }
            match &s.graph {
                Some(g) => g.0.launch()?,
                None => return Err(Error::Unsupported("the decode step could not be captured".into())),
            }
            dev.read(&s.ids, &mut id)?;
            dev.synchronize()?;
            pos += 1;
            if !emit(id[0])? {
                break;
            }
        }
        Ok(())
    }

    /// Decode steps from token `first` at position `pos`, one persistent launch per token,
    /// [`QUEUED_STEPS`] queued at a time (the first alone, so its latency is measured).
    fn decode_persistent(&self, s: &mut GpuSeq, first: u32, pos: usize, max_new: usize, emit: &mut dyn FnMut(i32) -> Result<bool>) -> Result<()> {
        let d = &self.dims;
        let dev = &self.dev;
        if s.persistent.is_none() {
            // Shared floats: the phase's input, then the norm weights (decode.cu's `after`).
            s.persistent = Some(Persistent::new(dev, &self.block_table(s), self.width() + d.dim, d.n_head, d.head_dim, d.context)?);
        }
        let Some(p) = s.persistent.as_mut() else { unreachable!() };
        if p.tokens.len() < max_new {
            p.tokens = dev.alloc(max_new)?;
        }
        dev.write(&mut s.ids, &[first as i32])?;
        dev.write(&mut s.meta, &[pos as i32, 0])?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let m = DModel {
            layers: p.layers.ptr,
            embed: self.embed.ptr(),
            out: head.ptr(),
            norm: self.norm.ptr,
            rope: self.rope.ptr,
            x: s.x.ptr,
            q: s.q.ptr,
            att: s.att.ptr,
            h: s.gate.ptr,
            logits: 0,
            po: p.po.ptr,
            pml: p.pml.ptr,
            best_v: p.best_v.ptr,
            best_i: p.best_i.ptr,
            ids: s.ids.ptr,
            meta: s.meta.ptr,
            tokens: p.tokens.ptr,
            bar: p.bar.ptr,
            dim: d.dim as i32,
            hidden: d.hidden as i32,
            nh: d.n_head as i32,
            nkv: d.n_kv_head as i32,
            hd: d.head_dim as i32,
            vocab: d.vocab as i32,
            n_layer: d.n_layer as i32,
            interleaved: d.rope_interleaved as i32,
            t_embed: self.embed.ty as i32,
            t_out: head.ty as i32,
            timing: p.timing.as_ref().map_or(0, |t| t.ptr),
            eps: d.rms_eps,
            scale: 1.0 / (d.head_dim as f32).sqrt(),
            stage: p.stage as i32,
            pad: 0,
        };
        let mut ids = [0i32; QUEUED_STEPS];
        let mut done = 0;
        while done < max_new {
            let b = if done == 0 { 1 } else { QUEUED_STEPS.min(max_new - done) };
            for _ in 0..b {
                // SAFETY: scratch fitted for one token (`h` is `gate`, `hidden` wide), the caches
                // for the whole context (`pos + max_new` checked by the caller), the partials
                // for its splits, `tokens` for `max_new` ids.
                unsafe { dev.decode_step(&m, p)? };
            }
            dev.read_at(&p.tokens, done, &mut ids[..b])?;
            dev.synchronize()?;
            let stop = ids[..b].iter().map(|&t| emit(t)).find(|go| !matches!(go, Ok(true)));
            if let Some(stop) = stop {
                stop?;
                break;
            }
            done += b;
        }
        if let Some(t) = &p.timing {
            let mut stamps = vec![0i64; t.len()];
            dev.read(t, &mut stamps)?;
            eprintln!("{}", crate::mega::timing_report(&stamps, d.n_layer, dev.clock_khz()?));
        }
        Ok(())
    }

    /// The persistent step's table of blocks, with `s`'s caches.
    fn block_table(&self, s: &GpuSeq) -> Vec<DLayer> {
        let layers = self.layers.iter().zip(s.kc.iter().zip(&s.vc));
        layers
            .map(|(w, (kc, vc))| {
                let mats = [&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down];
                DLayer {
                    attn_norm: w.attn_norm.ptr,
                    ffn_norm: w.ffn_norm.ptr,
                    w: mats.map(DevMat::ptr),
                    bias: [0, 1, 2].map(|i| w.bias[i].as_ref().map_or(0, |b| b.ptr)),
                    kc: kc.ptr,
                    vc: vc.ptr,
                    ty: mats.map(|m| m.ty as i32),
                    pad: 0,
                }
            })
            .collect()
    }

    /// One decode step from the token in `s.ids[0]` to the argmax written back there.
    unsafe fn step(&self, s: &GpuSeq, nsplit: usize) -> Result<()> {
        self.encode(s, 1, false, self.dims.n_layer, nsplit)?;
        self.head(s, s.x.ptr, 1)?;
        self.dev.argmax(s.logits.ptr, 1, self.dims.vocab, s.ids.ptr)
    }
}

impl GpuSeq {
    /// The device this sequence lives on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// After a tree pass that appended nodes at `base..`, keep the nodes `keep` (in path order)
    /// at `base..base + keep.len()`. A failure is reported by the next pass.
    pub fn keep(&mut self, base: usize, keep: &[usize]) {
        if let Err(e) = self.try_keep(base, keep) {
            self.failed = Some(e.to_string());
        }
    }

    fn try_keep(&mut self, base: usize, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            return Ok(());
        }
        if self.keep.len() < keep.len() {
            self.keep = self.dev.alloc(keep.len())?;
        }
        let idx: Vec<i32> = keep.iter().map(|&k| k as i32).collect();
        self.dev.write(&mut self.keep, &idx)?;
        for (kc, vc) in self.kc.iter().zip(&self.vc) {
            // SAFETY: the caches hold the whole context; `keep` the indices just written.
            unsafe { self.dev.keep_rows(kc.ptr, vc.ptr, self.keep.ptr, keep.len(), base, self.kvd)? };
        }
        self.dev.synchronize()
    }
}
