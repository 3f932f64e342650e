//! The forward pass on a CUDA device (feature `cuda`): [`Llama::to_device`] uploads the weights
//! once; every later pass of [`Llama::forward`], [`Llama::forward_tree`] and
//! [`Llama::forward_early_exit`] runs there, with the KV cache in the [`State`] on the device.

use std::sync::Arc;
use std::time::Duration;

use augur_cuda::{Device, Dims, GpuModel, LayerWeights, Out, Pass};

use crate::{Error, Llama, Logits, Result, State};

impl Llama {
    /// Move the forward pass to CUDA device `ordinal`: the weights are copied there in their
    /// own block layout, and every later pass runs there. States used before must not be used
    /// after (their caches are on the host).
    pub fn to_device(&mut self, ordinal: usize) -> Result<()> {
        let dev = Device::open(ordinal)?;
        let c = &self.cfg;
        let dims = Dims {
            dim: c.dim,
            hidden: c.hidden,
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
            vocab: c.vocab,
            context: c.context,
            rms_eps: c.rms_eps,
            rope_interleaved: c.rope_interleaved,
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(LayerWeights {
                attn_norm: &l.attn_norm,
                wq: l.wq.matrix()?,
                wk: l.wk.matrix()?,
                wv: l.wv.matrix()?,
                wo: l.wo.matrix()?,
                bias: [l.bq.as_deref(), l.bk.as_deref(), l.bv.as_deref()],
                ffn_norm: &l.ffn_norm,
                w_gate: l.w_gate.matrix()?,
                w_up: l.w_up.matrix()?,
                w_down: l.w_down.matrix()?,
            });
        }
        let output = if self.tied { None } else { Some(self.output.matrix()?) };
        let gpu = GpuModel::upload(&dev, dims, self.embed.matrix()?, layers, &self.norm, output, &self.inv_freq)?;
        self.gpu = Some(Arc::new(gpu));
        Ok(())
    }

    /// The device copy of the weights, once [`Llama::to_device`] made one.
    pub fn gpu(&self) -> Option<&GpuModel> {
        self.gpu.as_deref()
    }
}

/// [`Llama::greedy_on_device`] on `gpu`.
pub(crate) fn greedy(gpu: &GpuModel, st: &mut State, prompt: &[u32], max_new: usize, on_token: &mut dyn FnMut(u32) -> bool) -> Result<(Duration, Duration)> {
    let pos0 = st.pos;
    let run = gpu.greedy_with(gpu.decoder(), device_seq(gpu, st)?, pos0, prompt, max_new, on_token)?;
    // The last prompt token was the first step's input; each later step's input was the
    // token generated before it.
    st.pos += prompt.len() - 1 + run.tokens.len();
    Ok((run.prefill, run.decode))
}

/// `st`'s cache on the device, made on first use; a state whose cache is on the host is refused.
fn device_seq<'s>(gpu: &GpuModel, st: &'s mut State) -> Result<&'s mut augur_cuda::GpuSeq> {
    if st.gpu.is_none() {
        if st.pos != 0 {
            return Err(Error::Config("this state's cache is on the host; start a new State for a model on a device".into()));
        }
        st.gpu = Some(gpu.new_seq()?);
    }
    Ok(st.gpu.as_mut().expect("set above"))
}

/// One pass of one sequence on the device; logits (or hidden states) land in the state's host
/// buffers as on the CPU path.
pub(crate) fn run<'s>(
    gpu: &GpuModel,
    st: &'s mut State,
    tokens: &[u32],
    tree: Option<(&[usize], &[bool])>,
    n_layers: usize,
    which: Logits,
) -> Result<&'s [f32]> {
    let cfg = &gpu.dims;
    let n = tokens.len();
    let (out, n_out) = match which {
        Logits::Last => (Out::Last, 1),
        Logits::All => (Out::All, n),
        Logits::Hidden => (Out::Hidden, n),
    };
    let vocab = if which == Logits::Hidden { 0 } else { cfg.vocab };
    if st.logits.len() < n_out * vocab {
        st.logits.resize(n_out * vocab, 0.0);
    }
    if st.xn.len() < n_out * cfg.dim {
        st.xn.resize(n_out * cfg.dim, 0.0);
    }
    device_seq(gpu, st)?;
    // The device pass takes the whole `[n, pos0 + n]` mask: the cached prefix is visible to
    // every node, then the tree's own ancestry.
    let pos0 = st.pos;
    if let Some((_, anc)) = tree {
        st.mask.clear();
        for row in anc.chunks_exact(n) {
            st.mask.extend(std::iter::repeat_n(true, pos0));
            st.mask.extend_from_slice(row);
        }
    }
    let tree = tree.map(|(depth, _)| (depth, &st.mask[..]));
    let seq = st.gpu.as_mut().expect("set above");
    let pass = Pass { tokens, pos0, tree, n_layers, out };
    gpu.forward(seq, &pass, &mut st.logits[..n_out * vocab], &mut st.xn[..n_out * cfg.dim])?;
    st.pos += n;
    st.hidden_rows = n_out;
    Ok(&st.logits[..n_out * vocab])
}

/// One decode step for several sequences ([`Llama::forward_many`]): on the device each sequence
/// takes its own single-token pass (correct, not yet batched), the logits rows gathered into
/// `scratch`.
pub(crate) fn run_many<'s>(gpu: &GpuModel, scratch: &'s mut State, seqs: &mut [&mut State], tokens: &[u32], n_layers: usize) -> Result<&'s [f32]> {
    let vocab = gpu.dims.vocab;
    if scratch.logits.len() < tokens.len() * vocab {
        scratch.logits.resize(tokens.len() * vocab, 0.0);
    }
    for (t, (s, &tok)) in seqs.iter_mut().zip(tokens).enumerate() {
        let row = run(gpu, s, &[tok], None, n_layers, Logits::Last)?;
        scratch.logits[t * vocab..(t + 1) * vocab].copy_from_slice(row);
    }
    Ok(&scratch.logits[..tokens.len() * vocab])
}
