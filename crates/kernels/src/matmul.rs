//! `y = x · Wᵀ` for a weight matrix `W` of `rows × k` (one output feature per row, as GGUF and
//! PyTorch's `Linear` store them) and a small batch of activation rows `x` (`n_tok × k`).
//!
//! Design: up to [`ACTQ_MAX_BATCH`] tokens (decode, speculative verification) run a fused
//! dequantize-and-dot per weight row and token, rows split across the worker pool (the row is read
//! from memory once and stays in cache for the other tokens); on a matrix with a packed copy
//! ([`Matrix::with_packed`]), 16-row groups split across the pool instead (and the model feeds
//! longer batches to it in chunks). Longer batches on other matrices (prefill) dequantize a
//! panel of weight rows once into a thread-local f32 buffer and multiply every token against it
//! with `gemm`. Rejected: dequantizing the whole matrix per call (memory traffic), and per-token
//! loops over rows (reads weights `n_tok` times).

use std::cell::RefCell;

use half::{bf16, f16};

use crate::actq::ActQ;
use crate::dot::{dot_f32, dot_quant};
use crate::packed::{Packed, GROUP_ROWS};
use crate::pool;
use crate::quant::QuantType;

/// Borrowed weight storage of a matrix, row-major, `rows × k`.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// f32 weights.
    F32(&'a [f32]),
    /// f16 weights.
    F16(&'a [f16]),
    /// bf16 weights.
    BF16(&'a [bf16]),
    /// GGUF blocks; each row is `ty.row_bytes(k)` bytes.
    Quant(QuantType, &'a [u8]),
}

/// A borrowed `rows × k` weight matrix.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// The storage.
    pub weights: Weights<'a>,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (row length).
    pub k: usize,
    /// The same blocks repacked for the AVX-512 integer kernel ([`Matrix::with_packed`]), which
    /// [`matmul_actq`] then reads instead of `weights`.
    pub packed: Option<&'a Packed>,
}

impl<'a> Matrix<'a> {
    /// Checks that the storage holds exactly `rows × k` weights.
    pub fn new(weights: Weights<'a>, rows: usize, k: usize) -> Option<Self> {
        let ok = match weights {
            Weights::F32(w) => w.len() == rows * k,
            Weights::F16(w) => w.len() == rows * k,
            Weights::BF16(w) => w.len() == rows * k,
            Weights::Quant(ty, w) => ty.row_bytes(k).is_some_and(|rb| w.len() == rb * rows),
        };
        ok.then_some(Matrix { weights, rows, k, packed: None })
    }

    /// This matrix with `packed`, its blocks in the grouped layout, for [`matmul_actq`] (ignored
    /// unless it holds the same type and shape).
    pub fn with_packed(self, packed: &'a Packed) -> Self {
        let same = matches!(self.weights, Weights::Quant(ty, _) if ty == packed.ty()) && packed.rows() == self.rows && packed.k() == self.k;
        Matrix { packed: same.then_some(packed), ..self }
    }

    /// Dequantize row `r` into `dst` (`k` values).
    pub fn row_f32(&self, r: usize, dst: &mut [f32]) {
        let k = self.k;
        match self.weights {
            Weights::F32(w) => dst.copy_from_slice(&w[r * k..(r + 1) * k]),
            Weights::F16(w) => {
                for (d, s) in dst.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *d = s.to_f32();
                }
            }
            Weights::BF16(w) => {
                for (d, s) in dst.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *d = s.to_f32();
                }
            }
            Weights::Quant(ty, w) => {
                let rb = ty.block_bytes() * (k / ty.block_len());
                ty.dequantize_row(&w[r * rb..(r + 1) * rb], dst)
            }
        }
    }

    /// `W[r] · x`.
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let k = self.k;
        match self.weights {
            Weights::F32(w) => dot_f32(&w[r * k..(r + 1) * k], x),
            Weights::Quant(ty, w) => {
                let rb = ty.block_bytes() * (k / ty.block_len());
                dot_quant(ty, &w[r * rb..(r + 1) * rb], x)
            }
            Weights::F16(_) | Weights::BF16(_) => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                grow(&mut s, k);
                self.row_f32(r, &mut s[..k]);
                dot_f32(&s[..k], x)
            }),
        }
    }
}

thread_local! {
    /// Per-thread dequantization buffer; grows to the largest panel seen, then never reallocates.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Whether [`matmul_actq`] can run this matrix (Q4_0/Q4_1/Q8_0 with an integer kernel on this CPU).
pub fn actq_supported(m: &Matrix) -> bool {
    matches!(m.weights, Weights::Quant(ty, _) if crate::dot_actq::supported(ty))
}

/// Most tokens [`matmul_actq`] takes in one call (larger batches go through `gemm`).
pub const ACTQ_MAX_BATCH: usize = 16;

/// `y[t] = W · x_t` for tokens whose activations are already quantized in `acts` (see
/// [`crate::actq`]); `y` is `[acts.len(), rows]`. `m` must satisfy [`actq_supported`]. Each
/// weight row is read once for all tokens.
pub fn matmul_actq(m: &Matrix, acts: &[ActQ], y: &mut [f32]) {
    matmul_actq_group([m], &mut [y], acts)
}

/// One matrix of a group: type, blocks, bytes per row, output, rows.
type Part<'a> = (QuantType, &'a [u8], usize, pool::SyncPtr<f32>, usize);

/// [`matmul_actq`] for several matrices that share their input (q/k/v, gate/up) in one parallel
/// region: one dispatch instead of one per matrix. Allocation-free.
pub fn matmul_actq_group<const M: usize>(ms: [&Matrix; M], ys: &mut [&mut [f32]; M], acts: &[ActQ]) {
    let n = acts.len();
    assert!((1..=ACTQ_MAX_BATCH).contains(&n), "matmul_actq: {n} tokens (1..={ACTQ_MAX_BATCH})");
    assert!(acts.iter().all(ActQ::is_complete), "matmul_actq: activations must be filled by ActQ::quantize");
    let mut fixed: [Option<Part>; M] = [None; M];
    let mut total = 0;
    for (slot, (m, y)) in fixed.iter_mut().zip(ms.iter().zip(ys.iter_mut())) {
        let Weights::Quant(ty, w) = m.weights else { panic!("matmul_actq: weights are not quantized") };
        assert!(acts.iter().all(|a| a.len() == m.k), "matmul_actq: activations must have {} values", m.k);
        assert_eq!(y.len(), n * m.rows, "matmul_actq: y has {} values, want {n}x{}", y.len(), m.rows);
        let rb = ty.block_bytes() * (m.k / ty.block_len());
        *slot = Some((ty, w, rb, pool::SyncPtr::new(y.as_mut_ptr()), m.rows));
        total += m.rows;
    }
    let parts = &fixed[..];
    let refs: [&ActQ; ACTQ_MAX_BATCH] = std::array::from_fn(|i| &acts[i.min(n - 1)]);
    let pool = pool::global();
    if acts[0].format == crate::actq::Format::Wide && crate::packed::available() && ms.iter().all(|m| m.packed.is_some()) {
        let packs: [(&Packed, pool::SyncPtr<f32>); M] = std::array::from_fn(|i| (ms[i].packed.expect("checked above"), parts[i].as_ref().expect("filled above").3));
        return matmul_packed(&packs, &refs[..n]);
    }
    // About two chunks per thread. On a Zen 4 with 32 MiB of L3, decode went 117-127 -> 134-139
    // tok/s against eight chunks per thread (BENCHMARKS.md); thirty-two were slower still, one
    // left the threads unbalanced. Not the chunks' cold first rows alone: prefetching each
    // chunk's first 4 KB changed nothing.
    let chunk = (total / (pool.threads() * 2)).clamp(16, 1024);
    // Rows per kernel call: the kernels take consecutive rows of one matrix together.
    const RUN: usize = 16;
    pool.for_chunks(total, chunk, &|range| {
        let mut out = [0f32; RUN * ACTQ_MAX_BATCH];
        for_parts(range, |i| parts[i].as_ref().expect("filled above").4, |part, local| {
            let (ty, w, rb, yp, rows) = parts[part].as_ref().expect("filled above");
            for r0 in local.clone().step_by(RUN) {
                let len = RUN.min(local.end - r0);
                crate::dot_actq::dot_rows_unchecked(*ty, &w[r0 * rb..(r0 + len) * rb], *rb, &refs[..n], &mut out[..len * n]);
                for (i, row) in out[..len * n].chunks_exact(n).enumerate() {
                    for (t, v) in row.iter().enumerate() {
                        // SAFETY: element (t, r) of this matrix belongs to row r, owned by this chunk.
                        unsafe { yp.slice(t * rows + r0 + i, 1)[0] = *v };
                    }
                }
            }
        });
    });
}

/// `f(part, items)` for each part's share of `range`, a range over the items of several parts
/// laid end to end (`len(i)` items in part `i`), in order.
fn for_parts(range: std::ops::Range<usize>, len: impl Fn(usize) -> usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
    let (mut part, mut base) = (0, 0);
    let mut g = range.start;
    while g < range.end {
        while g >= base + len(part) {
            base += len(part);
            part += 1;
        }
        let end = (range.end - base).min(len(part));
        f(part, g - base..end);
        g = base + end;
    }
}

/// [`matmul_actq_group`] on packed matrices: 16-row groups split across the pool, about two
/// chunks per thread as in the GGUF-layout path.
fn matmul_packed<const M: usize>(packs: &[(&Packed, pool::SyncPtr<f32>); M], acts: &[&ActQ]) {
    let total: usize = packs.iter().map(|(p, _)| p.rows() / GROUP_ROWS).sum();
    let pool = pool::global();
    let chunk = (total / (pool.threads() * 2)).clamp(1, 64);
    pool.for_chunks(total, chunk, &|range| {
        for_parts(range, |i| packs[i].0.rows() / GROUP_ROWS, |part, groups| {
            let (p, y) = packs[part];
            // SAFETY: this chunk owns rows 16·groups.start .. 16·groups.end of every token's output.
            unsafe { p.dot_groups(groups.clone(), acts, y.ptr().add(groups.start * GROUP_ROWS), p.rows()) };
        });
    });
}

/// Weight rows per parallel task for the batched path.
const PANEL: usize = 32;

/// `y[t*rows + r] = Σ_j x[t*k + j] · W[r][j]` for `t < n_tok`.
pub fn matmul(m: &Matrix, x: &[f32], n_tok: usize, y: &mut [f32]) {
    let (rows, k) = (m.rows, m.k);
    assert_eq!(x.len(), n_tok * k, "matmul: x has {} values, want {n_tok}x{k}", x.len());
    assert_eq!(y.len(), n_tok * rows, "matmul: y has {} values, want {n_tok}x{rows}", y.len());
    if n_tok == 0 {
        return;
    }
    let pool = pool::global();
    let yp = pool::SyncPtr::new(y.as_mut_ptr());
    if n_tok <= ACTQ_MAX_BATCH {
        // Small batches use the one-token dot per token (the row stays in cache), so a token's
        // result does not depend on the batch it came in: speculative verification then
        // reproduces plain decoding bit for bit.
        let chunk = (rows / (pool.threads() * 8)).clamp(16, 1024);
        pool.for_chunks(rows, chunk, &|range| {
            for r in range {
                for t in 0..n_tok {
                    // SAFETY: element (t, r) belongs to row r, owned by this chunk.
                    unsafe { yp.slice(t * rows + r, 1)[0] = m.dot_row(r, &x[t * k..(t + 1) * k]) };
                }
            }
        });
        return;
    }
    let n_panels = rows.div_ceil(PANEL);
    pool.for_chunks(n_panels, 1, &|panels| {
      for p in panels {
        let r0 = p * PANEL;
        let nr = PANEL.min(rows - r0);
        let yp = &yp;
        let run = |panel: &[f32]| {
            // SAFETY: panel p writes only columns r0..r0+nr of y, disjoint from every other panel;
            // all pointers stay inside x (n_tok×k), panel (nr×k) and y (n_tok×rows).
            unsafe {
                gemm::gemm(
                    n_tok,
                    nr,
                    k,
                    yp.ptr().add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        match m.weights {
            Weights::F32(w) => run(&w[r0 * k..(r0 + nr) * k]),
            _ => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                grow(&mut s, PANEL * k);
                for i in 0..nr {
                    m.row_f32(r0 + i, &mut s[i * k..(i + 1) * k]);
                }
                run(&s[..nr * k]);
            }),
        }
      }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    fn data(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn check(m: &Matrix, n_tok: usize, seed: u64) -> Result<(), TestCaseError> {
        let x = data(seed, n_tok * m.k);
        let mut y = vec![0f32; n_tok * m.rows];
        matmul(m, &x, n_tok, &mut y);
        let want = reference::matmul_rows(n_tok, m.k, m.rows, &x, |r, d| m.row_f32(r, d));
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            prop_assert!((a - b).abs() <= 1e-4 * (1.0 + m.k as f32).sqrt(), "{:?} at {}: {} vs {}", m.weights, i, a, b);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matmul_matches_reference(seed in 1u64..1000, rows in 1usize..80, blocks in 1usize..3, n_tok in prop::sample::select(vec![1usize, 3, 16, 17, 21])) {
            for ty in QuantType::ALL {
                let k = blocks * ty.block_len();
                let w = data(seed, rows * k);
                let q: Vec<u8> = w.chunks(k).flat_map(|r| ty.quantize_row(r)).collect();
                check(&Matrix::new(Weights::Quant(ty, &q), rows, k).unwrap(), n_tok, seed + 1)?;
            }
            let k = blocks * 32 + 5; // dense weights take any k
            let w = data(seed, rows * k);
            check(&Matrix::new(Weights::F32(&w), rows, k).unwrap(), n_tok, seed + 2)?;
            let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check(&Matrix::new(Weights::F16(&h), rows, k).unwrap(), n_tok, seed + 3)?;
            let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            check(&Matrix::new(Weights::BF16(&b), rows, k).unwrap(), n_tok, seed + 4)?;
        }
    }

    #[test]
    fn actq_matmul_matches_its_reference() {
        for ty in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0] {
            let (rows, k) = (77, 96);
            let w = data(9, rows * k);
            let q: Vec<u8> = w.chunks(k).flat_map(|r| ty.quantize_row(r)).collect();
            let m = Matrix::new(Weights::Quant(ty, &q), rows, k).unwrap();
            if !actq_supported(&m) {
                continue;
            }
            for n in [1, 3, 16] {
                let acts: Vec<ActQ> = (0..n).map(|t| { let mut a = ActQ::default(); a.quantize(&data(10 + t as u64, k)); a }).collect();
                let mut y = vec![0f32; n * rows];
                matmul_actq(&m, &acts, &mut y);
                let rb = ty.row_bytes(k).unwrap();
                for (i, v) in y.iter().enumerate() {
                    let (t, r) = (i / rows, i % rows);
                    let want = crate::dot_actq::dot_reference(ty, &q[r * rb..(r + 1) * rb], &acts[t]);
                    assert!((v - want).abs() < 1e-4, "{} token {t} row {r}: {v} vs {want}", ty.name());
                }
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        let w = vec![0f32; 10];
        assert!(Matrix::new(Weights::F32(&w), 3, 3).is_none());
        let q = vec![0u8; 20];
        assert!(Matrix::new(Weights::Quant(QuantType::Q4_1, &q), 1, 33).is_none());
        assert!(Matrix::new(Weights::Quant(QuantType::Q4_1, &q), 1, 32).is_some());
    }
}
