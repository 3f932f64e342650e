//! Kernel benchmarks (`cargo bench -p augur-kernels`): quantized matvec per block type (f32 and
//! integer-activation paths), batched matmul, attention, RMSNorm and RoPE, at SmolLM2-135M shapes.

use augur_kernels::actq::{ActQ, Format};
use augur_kernels::attention::{attention, quantize_row, Cache, Mask, Shape};
use augur_kernels::matmul::{actq_supported, matmul, matmul_actq, Matrix, Weights};
use augur_kernels::vec::{rms_norm, rope, rope_angles};
use augur_kernels::QuantType;
use divan::counter::ItemsCount;
use divan::Bencher;

fn main() {
    divan::main();
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761) % 2000) as f32 / 1000.0 - 1.0).collect()
}

/// SmolLM2's FFN up projection: 1536 x 576.
const ROWS: usize = 1536;
const K: usize = 576;

fn weights(ty: QuantType) -> Vec<u8> {
    let k = K.next_multiple_of(ty.block_len());
    data(ROWS * k).chunks(k).flat_map(|r| ty.quantize_row(r)).collect()
}

#[divan::bench(consts = [0, 1, 2, 3, 4, 5, 6, 7])]
fn matvec_f32_activations<const T: usize>(b: Bencher) {
    let ty = QuantType::ALL[T];
    let k = K.next_multiple_of(ty.block_len());
    let w = weights(ty);
    let m = Matrix::new(Weights::Quant(ty, &w), ROWS, k).unwrap();
    let x = data(k);
    let mut y = vec![0f32; ROWS];
    b.counter(ItemsCount::new(ROWS * k)).bench_local(|| matmul(&m, &x, 1, &mut y));
}

/// Integer activations in three int8 planes (22 bits).
#[divan::bench(consts = [0, 1, 4])]
fn matvec_int_planes<const T: usize>(b: Bencher) {
    matvec_int(b, QuantType::ALL[T], Format::Planes)
}

/// Integer activations as i16 (16 bits).
#[divan::bench(consts = [0, 1, 4])]
fn matvec_int_wide<const T: usize>(b: Bencher) {
    matvec_int(b, QuantType::ALL[T], Format::Wide)
}

/// One long row (the kernel's inner loop without per-row costs), one thread.
#[divan::bench(args = [Format::Planes, Format::Wide])]
fn dot_long_row_one_thread(b: Bencher, format: Format) {
    let ty = QuantType::Q4_1;
    let k = ROWS * K;
    let w = ty.quantize_row(&data(k));
    let mut a = ActQ::new(format);
    a.quantize(&data(k));
    let mut y = [0f32];
    b.counter(ItemsCount::new(k)).bench_local(|| {
        augur_kernels::dot_actq::dot_many(ty, &w, &[&a], &mut y);
        divan::black_box(y[0]);
    });
}

/// The integer dot alone on one thread (no pool, no quantization): rows of 576 Q4_1 weights.
#[divan::bench(args = [Format::Planes, Format::Wide])]
fn dot_rows_one_thread(b: Bencher, format: Format) {
    let ty = QuantType::Q4_1;
    let w = weights(ty);
    let mut a = ActQ::new(format);
    a.quantize(&data(K));
    let rb = ty.row_bytes(K).unwrap();
    let mut y = [0f32];
    b.counter(ItemsCount::new(ROWS * K)).bench_local(|| {
        for r in w.chunks_exact(rb) {
            augur_kernels::dot_actq::dot_many(ty, r, &[&a], &mut y);
            divan::black_box(y[0]);
        }
    });
}

/// A batch of `n` i16 vectors against the 1536 x 576 Q4_1 matrix (in cache): the integer
/// kernel's compute throughput for speculative verification (counter: multiply-adds).
#[divan::bench(args = [1, 2, 4, 8, 16])]
fn matmul_int_wide_batch(b: Bencher, n: usize) {
    let ty = QuantType::Q4_1;
    let w = weights(ty);
    let acts: Vec<ActQ> = (0..n)
        .map(|t| {
            let mut a = ActQ::new(Format::Wide);
            a.quantize(&data(K + t * 32)[t * 32..]);
            a
        })
        .collect();
    let m = Matrix::new(Weights::Quant(ty, &w), ROWS, K).unwrap();
    let mut y = vec![0f32; ROWS * n];
    b.counter(ItemsCount::new(ROWS * K * n)).bench_local(|| matmul_actq(&m, &acts, &mut y));
}

/// The 1536 x 576 Q4_1 matrix against a batch of `n` i16 vectors on one thread (in cache), in
/// the GGUF layout (`dot_actq`) and repacked in 16-row groups (`packed`); counter: multiply-adds.
#[divan::bench(args = [1, 2, 4, 8, 16])]
fn int_batch_one_thread_gguf(b: Bencher, n: usize) {
    let (w, acts) = (weights(QuantType::Q4_1), wide_acts(n));
    let refs: Vec<&ActQ> = acts.iter().collect();
    let rb = QuantType::Q4_1.row_bytes(K).unwrap();
    let mut y = vec![0f32; n];
    b.counter(ItemsCount::new(ROWS * K * n)).bench_local(|| {
        for r in w.chunks_exact(rb) {
            augur_kernels::dot_actq::dot_many(QuantType::Q4_1, r, &refs, &mut y);
            divan::black_box(y[0]);
        }
    });
}

/// [`int_batch_one_thread_gguf`] on the packed layout.
#[divan::bench(args = [1, 2, 4, 8, 16])]
fn int_batch_one_thread_packed(b: Bencher, n: usize) {
    if !augur_kernels::packed::available() {
        return;
    }
    let (w, acts) = (weights(QuantType::Q4_1), wide_acts(n));
    let refs: Vec<&ActQ> = acts.iter().collect();
    let p = augur_kernels::packed::Packed::new(QuantType::Q4_1, &w, ROWS, K).unwrap();
    let mut y = vec![0f32; ROWS * n];
    // SAFETY: y holds n x ROWS values.
    b.counter(ItemsCount::new(ROWS * K * n)).bench_local(|| unsafe { p.dot_groups(0..ROWS / 16, &refs, y.as_mut_ptr(), ROWS) });
}

fn wide_acts(n: usize) -> Vec<ActQ> {
    (0..n)
        .map(|t| {
            let mut a = ActQ::new(Format::Wide);
            a.quantize(&data(K + t * 32)[t * 32..]);
            a
        })
        .collect()
}

fn matvec_int(b: Bencher, ty: QuantType, format: Format) {
    let w = weights(ty);
    let m = Matrix::new(Weights::Quant(ty, &w), ROWS, K).unwrap();
    if !actq_supported(&m) {
        return;
    }
    let mut a = ActQ::new(format);
    let x = data(K);
    let mut y = vec![0f32; ROWS];
    b.counter(ItemsCount::new(ROWS * K)).bench_local(|| {
        a.quantize(&x);
        matmul_actq(&m, std::slice::from_ref(&a), &mut y)
    });
}

#[divan::bench(args = [1, 4, 16, 128])]
fn matmul_q4_1_batch(b: Bencher, n_tok: usize) {
    let w = weights(QuantType::Q4_1);
    let m = Matrix::new(Weights::Quant(QuantType::Q4_1, &w), ROWS, K).unwrap();
    let x = data(n_tok * K);
    let mut y = vec![0f32; n_tok * ROWS];
    b.counter(ItemsCount::new(n_tok)).bench_local(|| matmul(&m, &x, n_tok, &mut y));
}

/// One decode step's attention for SmolLM2's shape (9 query heads on 3 KV heads of 64) over
/// `seq` cached positions, the cache in f32 and in 16-bit rows (counter: positions).
#[divan::bench(args = [128, 512, 2048])]
fn attention_decode(b: Bencher, seq: usize) {
    let shape = Shape { n_head: 9, n_kv_head: 3, head_dim: 64 };
    let q = data(9 * 64);
    let kc = data(seq * 3 * 64);
    let vc = data(seq * 3 * 64);
    let mut out = vec![0f32; q.len()];
    b.counter(ItemsCount::new(seq))
        .bench_local(|| attention(&q, Cache::F32 { k: &kc, v: &vc }, seq, shape, Mask::Causal { pos0: seq - 1 }, 0.125, &mut out));
}

/// [`attention_decode`] on a cache of 16-bit rows.
#[divan::bench(args = [128, 512, 2048])]
fn attention_decode_i16(b: Bencher, seq: usize) {
    let shape = Shape { n_head: 9, n_kv_head: 3, head_dim: 64 };
    let q = data(9 * 64);
    let rows16 = |x: Vec<f32>| {
        let mut out = vec![0i16; x.len()];
        let scales: Vec<f32> = x.chunks_exact(64).zip(out.chunks_exact_mut(64)).map(|(r, o)| quantize_row(r, o)).collect();
        (out, scales)
    };
    let ((k, ks), (v, vs)) = (rows16(data(seq * 3 * 64)), rows16(data(seq * 3 * 64)));
    let cache = Cache::I16 { k: &k, v: &v, k_scales: &ks, v_scales: &vs };
    let mut out = vec![0f32; q.len()];
    b.counter(ItemsCount::new(seq)).bench_local(|| attention(&q, cache, seq, shape, Mask::Causal { pos0: seq - 1 }, 0.125, &mut out));
}

#[divan::bench]
fn rms_norm_576(b: Bencher) {
    let (x, w) = (data(576), data(576));
    let mut out = vec![0f32; 576];
    b.bench_local(|| rms_norm(&x, &w, 1e-5, &mut out));
}

#[divan::bench]
fn rope_9_heads(b: Bencher) {
    let inv: Vec<f32> = (0..32).map(|i| 1.0 / 100000f32.powf(i as f32 / 32.0)).collect();
    let mut cs = vec![(0f32, 0f32); 32];
    let mut x = data(9 * 64);
    b.bench_local(|| {
        rope_angles(1234, &inv, &mut cs);
        rope(&mut x, 64, &cs, true)
    });
}
