//! The op registry: every public tensor op once, with its canonical dotted name, the names users
//! also reach for, its arguments, dtypes, devices and whether it is differentiable.
//!
//! The gradient checks and the conformance tests iterate over this list, so an op added here
//! cannot skip them, and `augur ops` prints it. The golden API file records it.

/// One public op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpInfo {
    /// Canonical dotted name (`tensor.matmul`, `nn.functional.softmax`).
    pub name: &'static str,
    /// Other names for the same op.
    pub aliases: &'static [&'static str],
    /// The Rust entry point.
    pub rust: &'static str,
    /// Arguments, as a signature summary.
    pub args: &'static str,
    /// Whether `backward` passes through it.
    pub differentiable: bool,
    /// One line on what it computes.
    pub doc: &'static str,
}

/// Element types every float op accepts (quantized tensors are accepted by `linear`,
/// `gather_rows` and `to_dtype` only, as noted in their docs).
pub const DTYPES: &[&str] = &["f32", "f64", "bf16", "f16"];

/// Devices the ops run on: the host, and NVIDIA GPUs through a `Backend` (augur-cuda's training
/// backend runs every op of this list; `augur_core::gradcheck` checks them there).
pub const DEVICES: &[&str] = &["cpu", "cuda"];

macro_rules! op {
    ($name:literal, [$($alias:literal),*], $rust:literal, $args:literal, $diff:literal, $doc:literal) => {
        OpInfo { name: $name, aliases: &[$($alias),*], rust: $rust, args: $args, differentiable: $diff, doc: $doc }
    };
}

/// Every public op, sorted by canonical name.
pub const OPS: &[OpInfo] = &[
    op!("tensor.abs", [], "Tensor::unary(UnaryOp::Abs)", "x", true, "|x|"),
    op!("tensor.add", ["tensor.__add__"], "Tensor::add", "a, b (broadcast)", true, "a + b"),
    op!("tensor.affine", [], "Tensor::affine", "x, mul, add", true, "x * mul + add"),
    op!("tensor.broadcast_to", ["tensor.expand"], "Tensor::broadcast_to", "x, shape", true, "view with size-1 dims stretched"),
    op!("tensor.cat", ["tensor.concat", "tensor.concatenate"], "Tensor::cat", "tensors, dim", true, "concatenation along dim"),
    op!("tensor.contiguous", [], "Tensor::contiguous", "x", true, "row-major copy"),
    op!("tensor.div", ["tensor.true_divide"], "Tensor::div", "a, b (broadcast)", true, "a / b"),
    op!("tensor.exp", [], "Tensor::exp", "x", true, "e^x"),
    op!("tensor.log", [], "Tensor::log", "x", true, "natural log"),
    op!("tensor.matmul", ["tensor.bmm", "tensor.__matmul__"], "Tensor::matmul", "a [.., m, k], b [.., k, n] or [k, n]", true, "batched matrix product (autocast-aware)"),
    op!("tensor.max_last", ["tensor.amax"], "Tensor::max_last", "x", false, "max over the last dim"),
    op!("tensor.maximum", [], "Tensor::maximum", "a, b (broadcast)", true, "elementwise max"),
    op!("tensor.mean_all", ["tensor.mean"], "Tensor::mean_all", "x", true, "mean of all elements"),
    op!("tensor.mean_last", [], "Tensor::mean_last", "x", true, "mean over the last dim"),
    op!("tensor.mul", ["tensor.__mul__", "tensor.multiply"], "Tensor::mul", "a, b (broadcast)", true, "a * b"),
    op!("tensor.narrow", ["tensor.slice"], "Tensor::narrow", "x, dim, start, len", true, "view of a range along dim"),
    op!("tensor.neg", [], "Tensor::neg", "x", true, "-x"),
    op!("tensor.pad", [], "Tensor::pad", "x, dim, start, full", true, "x inside zeros along dim (narrow's adjoint)"),
    op!("tensor.recip", ["tensor.reciprocal"], "Tensor::unary(UnaryOp::Recip)", "x", true, "1 / x"),
    op!("tensor.reshape", ["tensor.view"], "Tensor::reshape", "x, shape", true, "same elements, new shape"),
    op!("tensor.sqr", ["tensor.square"], "Tensor::unary(UnaryOp::Sqr)", "x", true, "x²"),
    op!("tensor.sqrt", [], "Tensor::sqrt", "x", true, "√x"),
    op!("tensor.sub", ["tensor.__sub__", "tensor.subtract"], "Tensor::sub", "a, b (broadcast)", true, "a - b"),
    op!("tensor.sum_all", ["tensor.sum"], "Tensor::sum_all", "x", true, "sum of all elements"),
    op!("tensor.sum_last", [], "Tensor::sum_last", "x", true, "sum over the last dim"),
    op!("tensor.sum_to", [], "Tensor::sum_to", "x, shape", true, "sum down to a broadcastable shape"),
    op!("tensor.to_dtype", ["tensor.to", "tensor.type"], "Tensor::to_dtype", "x, dtype", true, "dtype conversion (gradient in the input dtype)"),
    op!("tensor.transpose", [], "Tensor::transpose", "x, a, b", true, "view with two dims swapped"),
    op!("nn.functional.attention", ["nn.functional.scaled_dot_product_attention", "nn.functional.flash_attention"], "Tensor::attention", "q, k, v, bias?, mask", true, "FlashAttention with causal/boolean/tree masks, GQA, ALiBi, score bias"),
    op!("nn.functional.cross_entropy", [], "Tensor::cross_entropy", "logits [n, c], targets, ignore_index?", true, "mean negative log-likelihood of the targets"),
    op!("nn.functional.embedding", ["tensor.gather_rows"], "Tensor::gather_rows", "table [rows, dim], ids", true, "rows of a table"),
    op!("nn.functional.gelu", [], "Tensor::gelu", "x", true, "GELU (tanh approximation)"),
    op!("nn.functional.layer_norm", [], "Tensor::layer_norm", "x, w, b, eps", true, "LayerNorm over the last dim"),
    op!("nn.functional.linear", [], "Tensor::linear", "x, w [out, in]", true, "x · wᵀ (quantized weights frozen)"),
    op!("nn.functional.log_softmax", [], "Tensor::log_softmax_last", "x", true, "log-softmax over the last dim"),
    op!("nn.functional.relu", [], "Tensor::relu", "x", true, "max(x, 0)"),
    op!("nn.functional.rms_norm", [], "Tensor::rms_norm", "x, w, eps", true, "RMSNorm over the last dim"),
    op!("nn.functional.rope", ["nn.functional.rotary_embedding"], "Tensor::rope", "x [.., seq, d], cos, sin [seq, d/2], interleaved", true, "rotary position embedding"),
    op!("nn.functional.sigmoid", [], "Tensor::sigmoid", "x", true, "1 / (1 + e^-x)"),
    op!("nn.functional.silu", ["nn.functional.swish"], "Tensor::silu", "x", true, "x · sigmoid(x)"),
    op!("nn.functional.softmax", [], "Tensor::softmax_last", "x", true, "softmax over the last dim"),
    op!("nn.functional.tanh", ["tensor.tanh"], "Tensor::tanh", "x", true, "tanh"),
];

/// The op with this canonical name or alias.
pub fn find(name: &str) -> Option<&'static OpInfo> {
    OPS.iter().find(|o| o.name == name || o.aliases.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_sorted_within_namespaces() {
        let mut all: Vec<&str> = OPS.iter().flat_map(|o| std::iter::once(o.name).chain(o.aliases.iter().copied())).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a name or alias is used twice");
        for w in OPS.windows(2) {
            let ns = |s: &str| s.rsplit_once('.').map(|(a, _)| a.to_string()).unwrap_or_default();
            if ns(w[0].name) == ns(w[1].name) {
                assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
            }
        }
        assert_eq!(find("nn.functional.scaled_dot_product_attention").unwrap().name, "nn.functional.attention");
    }
}
