//! Medusa heads (Cai et al. 2024, Medusa-1): extra heads on the frozen target that read the
//! target's last hidden state and guess the tokens 2, 3, … positions ahead; their top candidates
//! form a sparse tree that the target verifies in one pass.
//!
//! Head `k` is a stack of residual SiLU blocks, `h ← h + silu(W h + b)`, followed by the
//! target's own output head (shared, frozen). On a CPU the output head is the costly part (49152
//! rows for SmolLM2), so the heads score a reduced vocabulary: the most frequent tokens of the
//! training data (as FR-Spec does for EAGLE's head). The tree is a fixed list of rank paths chosen
//! from each head's top-r accuracy measured on held-out data, in the spirit of Medusa's
//! `medusa_choices`: the nodes of highest estimated acceptance probability.
//!
//! File format (safetensors, every tensor f32): `medusa.{k}.{l}.weight` `[dim, dim]` and
//! `medusa.{k}.{l}.bias` `[dim]` for head `k`, block `l`; `medusa.vocab` `[v]` (token ids of the
//! reduced vocabulary); `medusa.accuracy` `[heads, ranks]` (held-out top-r accuracy per head).

use std::collections::BinaryHeap;
use std::path::Path;

use augur_core::Tensor;
use augur_kernels::matmul::{matmul, Matrix, Weights};
use augur_models::Llama;
use half::bf16;

use super::drafters::{Ctx, Drafter};
use super::tree::Tree;
use crate::{Error, Result};

/// One residual block `h ← h + silu(W h + b)`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    /// `[dim, dim]`, row-major (one output feature per row).
    pub weight: Vec<f32>,
    /// `[dim]`
    pub bias: Vec<f32>,
}

/// Trained Medusa heads, ready to draft for one target.
#[derive(Debug, Clone)]
pub struct MedusaHeads {
    dim: usize,
    /// Per head, its residual blocks.
    heads: Vec<Vec<ResBlock>>,
    /// Token ids the heads score.
    vocab: Vec<u32>,
    /// The target's output-head rows of `vocab`, `[vocab.len(), dim]`.
    head_w: Vec<bf16>,
    /// `accuracy[k][r]`: how often head `k`'s rank-`r` candidate was the right token.
    accuracy: Vec<Vec<f32>>,
}

fn tensor_f32(ck: &augur_formats::safetensors::Checkpoint, name: &str, shape: &[usize], path: &Path) -> Result<Vec<f32>> {
    let t = ck.get(name).map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
    if !shape.is_empty() && t.shape() != shape {
        return Err(Error::Spec(format!("{}: `{name}` has shape {:?}, expected {shape:?}", path.display(), t.shape())));
    }
    t.to_vec_f32().map_err(|e| Error::Spec(format!("{}: `{name}`: {e}", path.display())))
}

impl MedusaHeads {
    /// Heads from their parts; `head_w` is taken from `target`'s output head.
    pub fn new(target: &Llama, heads: Vec<Vec<ResBlock>>, vocab: Vec<u32>, accuracy: Vec<Vec<f32>>) -> Result<Self> {
        let dim = target.cfg.dim;
        if heads.is_empty() || heads.iter().any(|h| h.is_empty()) {
            return Err(Error::Spec("Medusa: at least one head with at least one block is needed".into()));
        }
        for b in heads.iter().flatten() {
            if b.weight.len() != dim * dim || b.bias.len() != dim {
                return Err(Error::Spec(format!("Medusa: a block's weight must be {dim}x{dim} and its bias {dim} (the target's width)")));
            }
        }
        if vocab.is_empty() {
            return Err(Error::Spec("Medusa: the reduced vocabulary is empty".into()));
        }
        if accuracy.len() != heads.len() || accuracy.iter().any(|a| a.is_empty()) {
            return Err(Error::Spec(format!("Medusa: accuracy needs one non-empty row per head ({} heads)", heads.len())));
        }
        let head_w = target.output_rows(&vocab).map_err(|e| Error::Spec(format!("Medusa vocabulary: {e}")))?;
        let head_w = head_w.into_iter().map(bf16::from_f32).collect();
        Ok(MedusaHeads { dim, heads, vocab, head_w, accuracy })
    }

    /// Load heads written by `augur train-medusa` for `target`.
    pub fn open(path: &Path, target: &Llama) -> Result<Self> {
        let ck = augur_formats::safetensors::Checkpoint::open(path).map_err(|e| Error::Spec(format!("Medusa heads: {e}")))?;
        let dim = target.cfg.dim;
        let mut heads = Vec::new();
        while ck.contains(&format!("medusa.{}.0.weight", heads.len())) {
            let k = heads.len();
            let mut blocks = Vec::new();
            while ck.contains(&format!("medusa.{k}.{}.weight", blocks.len())) {
                let l = blocks.len();
                let weight = tensor_f32(&ck, &format!("medusa.{k}.{l}.weight"), &[dim, dim], path)?;
                let bias = tensor_f32(&ck, &format!("medusa.{k}.{l}.bias"), &[dim], path)?;
                blocks.push(ResBlock { weight, bias });
            }
            heads.push(blocks);
        }
        if heads.is_empty() {
            return Err(Error::Spec(format!("{}: no `medusa.0.0.weight`: not a Medusa heads file (write one with `augur train-medusa`)", path.display())));
        }
        let vocab: Vec<u32> = tensor_f32(&ck, "medusa.vocab", &[], path)?.into_iter().map(|v| v as u32).collect();
        let acc = tensor_f32(&ck, "medusa.accuracy", &[], path)?;
        let ranks = acc.len() / heads.len();
        if ranks == 0 || acc.len() != ranks * heads.len() {
            return Err(Error::Spec(format!("{}: `medusa.accuracy` must be [heads, ranks] with {} heads", path.display(), heads.len())));
        }
        let accuracy = acc.chunks(ranks).map(<[f32]>::to_vec).collect();
        Self::new(target, heads, vocab, accuracy)
    }

    /// Number of heads (the deepest draft).
    pub fn n_heads(&self) -> usize {
        self.heads.len()
    }

    /// Held-out accuracy of each head's ranked candidates.
    pub fn accuracy(&self) -> &[Vec<f32>] {
        &self.accuracy
    }

    /// The `top` best tokens of every head (best first), from the hidden state `h`.
    pub fn candidates(&self, h: &[f32], top: usize) -> Vec<Vec<u32>> {
        let dim = self.dim;
        let mut hs = vec![0.0f32; self.heads.len() * dim];
        let mut t = vec![0.0f32; dim];
        for (blocks, out) in self.heads.iter().zip(hs.chunks_exact_mut(dim)) {
            out.copy_from_slice(h);
            for b in blocks {
                let m = Matrix::new(Weights::F32(&b.weight), dim, dim).expect("checked in new");
                matmul(&m, out, 1, &mut t);
                for ((o, &z), &bb) in out.iter_mut().zip(&t).zip(&b.bias) {
                    let x = z + bb;
                    *o += x / (1.0 + (-x).exp());
                }
            }
        }
        let m = Matrix::new(Weights::BF16(&self.head_w), self.vocab.len(), dim).expect("built in new");
        let mut logits = vec![0.0f32; self.heads.len() * self.vocab.len()];
        matmul(&m, &hs, self.heads.len(), &mut logits);
        logits.chunks_exact(self.vocab.len()).map(|l| top_ids(l, top).into_iter().map(|i| self.vocab[i]).collect()).collect()
    }
}

/// Indices of the `n` largest values, largest first.
fn top_ids(v: &[f32], n: usize) -> Vec<usize> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(n + 1);
    for (i, &x) in v.iter().enumerate() {
        if best.len() < n || x > best[best.len() - 1].0 {
            let at = best.partition_point(|&(b, _)| b >= x);
            best.insert(at, (x, i));
            best.truncate(n);
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// A tree node by ranks: `path[d]` is the rank, among head `d`'s candidates, of its token at
/// depth `d + 1`.
#[derive(Debug, Clone, PartialEq)]
struct Choice {
    value: f32,
    path: Vec<usize>,
}

impl Eq for Choice {}
impl PartialOrd for Choice {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Choice {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Higher value first; on ties the shallower node (so parents precede children).
        self.value.total_cmp(&o.value).then(o.path.len().cmp(&self.path.len()))
    }
}

/// The `n` rank paths of highest estimated acceptance (the product of the heads' accuracies
/// along the path), best first. Every prefix of a chosen path is chosen before it, so any
/// leading slice of the result is a valid tree.
pub fn choose_paths(accuracy: &[Vec<f32>], n: usize) -> Vec<Vec<usize>> {
    let mut heap = BinaryHeap::new();
    let push_children = |heap: &mut BinaryHeap<Choice>, parent: &Choice| {
        let d = parent.path.len();
        if d < accuracy.len() {
            for (r, &a) in accuracy[d].iter().enumerate() {
                let mut path = parent.path.clone();
                path.push(r);
                heap.push(Choice { value: parent.value * a, path });
            }
        }
    };
    push_children(&mut heap, &Choice { value: 1.0, path: vec![] });
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Some(c) = heap.pop() else { break };
        push_children(&mut heap, &c);
        out.push(c.path);
    }
    out
}

/// The Medusa drafter: the heads' candidates arranged as the fixed tree of [`choose_paths`].
pub struct Medusa {
    heads: MedusaHeads,
    paths: Vec<Vec<usize>>,
    /// Candidates needed per head (the largest rank any chosen path uses, plus one).
    top: usize,
}

impl Medusa {
    /// A drafter proposing at most `max_nodes` nodes per round.
    pub fn new(heads: MedusaHeads, max_nodes: usize) -> Self {
        let paths = choose_paths(heads.accuracy(), max_nodes);
        let top = paths.iter().flatten().max().map_or(1, |&r| r + 1);
        Medusa { heads, paths, top }
    }

    /// The tree's rank paths, best first.
    pub fn paths(&self) -> &[Vec<usize>] {
        &self.paths
    }
}

impl Drafter for Medusa {
    fn propose(&mut self, ctx: Ctx) -> Result<Tree> {
        let Some(h) = ctx.hidden else { return Ok(Tree::default()) };
        let cands = self.heads.candidates(h, self.top);
        let mut tree = Tree::default();
        let mut node_of: Vec<(&[usize], usize)> = Vec::new();
        for path in self.paths.iter().take(ctx.k) {
            let d = path.len() - 1;
            let parent = (d > 0).then(|| node_of.iter().find(|(p, _)| *p == &path[..d]).map(|&(_, i)| i).expect("prefix chosen first"));
            let Some(&tok) = cands[d].get(path[d]) else { continue };
            node_of.push((path, tree.push(tok, parent, None)));
        }
        Ok(tree)
    }

    fn adaptive(&self) -> bool {
        false
    }
}

/// Write heads to `path` in the format [`MedusaHeads::open`] reads (see the module docs), as
/// `augur train-medusa` does.
pub fn save_heads(path: &Path, heads: &[Vec<ResBlock>], dim: usize, vocab: &[u32], accuracy: &[Vec<f32>]) -> Result<()> {
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s).map_err(|e| Error::Spec(e.to_string()));
    let mut out = Vec::new();
    for (k, blocks) in heads.iter().enumerate() {
        for (l, b) in blocks.iter().enumerate() {
            out.push((format!("medusa.{k}.{l}.weight"), t(b.weight.clone(), &[dim, dim])?));
            out.push((format!("medusa.{k}.{l}.bias"), t(b.bias.clone(), &[dim])?));
        }
    }
    out.push(("medusa.vocab".into(), t(vocab.iter().map(|&v| v as f32).collect(), &[vocab.len()])?));
    let ranks = accuracy.first().map_or(0, Vec::len);
    out.push(("medusa.accuracy".into(), t(accuracy.concat(), &[accuracy.len(), ranks])?));
    let refs: Vec<(&str, &Tensor)> = out.iter().map(|(n, t)| (n.as_str(), t)).collect();
    augur_formats::safetensors::save(path, &refs).map_err(|e| Error::Spec(format!("writing Medusa heads: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_product_of_accuracies_and_keep_prefixes_first() {
        let acc = vec![vec![0.6, 0.2, 0.1], vec![0.5, 0.1, 0.05]];
        let p = choose_paths(&acc, 5);
        // values: [0] .6, [0,0] .3, [1] .2, then a tie at .1 between [2] and [1,0]: shallower first
        assert_eq!(p, vec![vec![0], vec![0, 0], vec![1], vec![2], vec![1, 0]]);
        for (i, path) in p.iter().enumerate() {
            assert!(p[..i].contains(&path[..path.len() - 1].to_vec()) || path.len() == 1, "{path:?} before its parent");
        }
    }

    #[test]
    fn top_ids_are_sorted() {
        assert_eq!(top_ids(&[0.1, 3.0, -1.0, 2.0, 2.5], 3), vec![1, 4, 3]);
        assert_eq!(top_ids(&[1.0], 4), vec![0]);
    }
}
