//! Conformance: every device kernel against the CPU backend (augur-kernels) on random inputs.
//! Without a CUDA device they skip, saying so; the NVRTC compile check needs only NVRTC.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use augur_kernels::attention::{attention, Cache, Mask, Shape};
use augur_kernels::matmul::{Matrix, Weights};
use augur_kernels::quant::QuantType;
use augur_kernels::vec::{rms_norm, rope, rope_angles, silu_mul};
use half::{bf16, f16};

use crate::device::{compile_uncached, Buf, KERNELS};
use crate::ops::{Input, ATT_SPAN};
use crate::Device;

/// The shared device (tests take turns: a captured graph must see no other thread's launches).
pub(crate) fn device() -> Option<(Arc<Device>, MutexGuard<'static, ()>)> {
    static DEV: OnceLock<Option<Arc<Device>>> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    let dev = DEV.get_or_init(|| match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: CUDA conformance tests need a device ({e})");
            None
        }
    });
    let dev = dev.clone()?;
    Some((dev, TURN.lock().unwrap_or_else(|p| p.into_inner())))
}

pub(crate) struct Rng(pub u64);
impl Rng {
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Relative L2 error of `got` against `want`.
pub(crate) fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output");
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn read(dev: &Device, b: &Buf<f32>, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    dev.read(b, &mut v).unwrap();
    dev.synchronize().unwrap();
    v
}

/// Random weights stored as every type the CPU supports.
enum Stored {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q(QuantType, Vec<u8>),
}

impl Stored {
    fn all(rng: &mut Rng, rows: usize, k: usize) -> Vec<Stored> {
        let w = rng.vec(rows * k);
        let mut v = vec![
            Stored::F32(w.clone()),
            Stored::F16(w.iter().map(|&x| f16::from_f32(x)).collect()),
            Stored::BF16(w.iter().map(|&x| bf16::from_f32(x)).collect()),
        ];
        for q in QuantType::ALL {
            v.push(Stored::Q(q, w.chunks_exact(k).flat_map(|r| q.quantize_row(r)).collect()));
        }
        v
    }
    fn matrix(&self, rows: usize, k: usize) -> Matrix<'_> {
        let w = match self {
            Stored::F32(w) => Weights::F32(w),
            Stored::F16(w) => Weights::F16(w),
            Stored::BF16(w) => Weights::BF16(w),
            Stored::Q(q, b) => Weights::Quant(*q, b),
        };
        Matrix::new(w, rows, k).unwrap()
    }
}

/// The dequantized rows, as the CPU backend reads them.
fn dense(m: &Matrix) -> Vec<f32> {
    let mut out = vec![0.0; m.rows * m.k];
    for (r, row) in out.chunks_exact_mut(m.k).enumerate() {
        m.row_f32(r, row);
    }
    out
}

fn reference_linear(w: &[f32], k: usize, x: &[f32], bias: Option<&[f32]>, y0: Option<&[f32]>) -> Vec<f32> {
    let rows = w.len() / k;
    let n = x.len() / k;
    let mut y = vec![0.0; n * rows];
    for t in 0..n {
        for r in 0..rows {
            let d: f64 = (0..k).map(|i| w[r * k + i] as f64 * x[t * k + i] as f64).sum();
            let v = d as f32 + bias.map_or(0.0, |b| b[r]) + y0.map_or(0.0, |y| y[t * rows + r]);
            y[t * rows + r] = v;
        }
    }
    y
}

#[test]
fn kernels_compile_for_hopper() {
    match compile_uncached(&KERNELS, "sm_90") {
        Ok(ptx) => {
            let src = ptx.to_src();
            if let Some(p) = std::env::var_os("AUGUR_PTX_OUT") {
                std::fs::write(p, &src).unwrap();
            }
            assert!(src.contains("matvec_q6_k"));
        }
        Err(crate::Error::NoNvrtc) => eprintln!("skipped: NVRTC is not installed"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn matvec_matches_cpu_for_every_type_and_input() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(7);
    let (rows, k) = (70, 512);
    for stored in Stored::all(&mut rng, rows, k) {
        let m = stored.matrix(rows, k);
        let w = dense(&m);
        let dm = dev.upload_matrix(&m).unwrap();
        for n in [1, 3, 8] {
            let (x, up, nw, bias, y0) = (rng.vec(n * k), rng.vec(n * k), rng.vec(k), rng.vec(rows), rng.vec(n * rows));
            let (dx, dup, dnw, db) = (dev.upload(&x).unwrap(), dev.upload(&up).unwrap(), dev.upload(&nw).unwrap(), dev.upload(&bias).unwrap());
            for mode in 0..3 {
                let (input, xin) = match mode {
                    0 => (Input::Plain, x.clone()),
                    1 => {
                        let mut o = vec![0.0; n * k];
                        for (xr, or) in x.chunks_exact(k).zip(o.chunks_exact_mut(k)) {
                            rms_norm(xr, &nw, 1e-5, or);
                        }
                        (Input::Norm { w: dnw.ptr, eps: 1e-5 }, o)
                    }
                    _ => {
                        let mut g = x.clone();
                        silu_mul(&mut g, &up);
                        (Input::SiluMul { up: dup.ptr }, g)
                    }
                };
                let acc = mode == 1;
                let want = reference_linear(&w, k, &xin, Some(&bias), acc.then_some(&y0[..]));
                let dy = dev.upload(&y0).unwrap();
                unsafe { dev.matvec(&[(&dm, dy.ptr, Some(db.ptr))], dx.ptr, n, input, acc).unwrap() };
                let got = read(&dev, &dy, n * rows);
                let e = rel(&got, &want);
                assert!(e < 1e-5, "matvec type {} n {n} mode {mode}: rel err {e}", dm.ty);
            }
        }
    }
}

#[test]
fn matvec_segments_share_one_input() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(11);
    let k = 256;
    let shapes = [40, 8, 24];
    let ws: Vec<Vec<f32>> = shapes.iter().map(|&r| rng.vec(r * k)).collect();
    let mats: Vec<_> = ws.iter().zip(shapes).map(|(w, r)| dev.upload_matrix(&Matrix::new(Weights::F32(w), r, k).unwrap()).unwrap()).collect();
    let n = 2;
    let x = rng.vec(n * k);
    let dx = dev.upload(&x).unwrap();
    let ys: Vec<_> = shapes.iter().map(|&r| dev.alloc::<f32>(n * r).unwrap()).collect();
    let segs: Vec<_> = mats.iter().zip(&ys).map(|(m, y)| (m, y.ptr, None)).collect();
    unsafe { dev.matvec(&segs, dx.ptr, n, Input::Plain, false).unwrap() };
    for ((w, y), r) in ws.iter().zip(&ys).zip(shapes) {
        let e = rel(&read(&dev, y, n * r), &reference_linear(w, k, &x, None, None));
        assert!(e < 1e-5, "segment of {r} rows: rel err {e}");
    }
}

#[test]
fn matmul_matches_cpu_for_every_type() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(3);
    let (rows, k, n) = (130, 512, 70);
    for stored in Stored::all(&mut rng, rows, k) {
        let m = stored.matrix(rows, k);
        let w = dense(&m);
        let dm = dev.upload_matrix(&m).unwrap();
        let (x, bias, y0) = (rng.vec(n * k), rng.vec(rows), rng.vec(n * rows));
        let (dx, db, dy) = (dev.upload(&x).unwrap(), dev.upload(&bias).unwrap(), dev.upload(&y0).unwrap());
        unsafe { dev.matmul(&dm, dx.ptr, dy.ptr, Some(db.ptr), n, true).unwrap() };
        let e = rel(&read(&dev, &dy, n * rows), &reference_linear(&w, k, &x, Some(&bias), Some(&y0)));
        assert!(e < 1e-5, "matmul type {}: rel err {e}", dm.ty);
    }
}

#[test]
fn embedding_rows_equal_cpu_dequantization() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(5);
    let (rows, k) = (50, 256);
    for stored in Stored::all(&mut rng, rows, k) {
        let m = stored.matrix(rows, k);
        let w = dense(&m);
        let dm = dev.upload_matrix(&m).unwrap();
        let ids = [3i32, 0, 49, 3];
        let di = dev.upload(&ids).unwrap();
        let out = dev.alloc::<f32>(ids.len() * k).unwrap();
        unsafe { dev.embed(&dm, di.ptr, ids.len(), out.ptr).unwrap() };
        let got = read(&dev, &out, ids.len() * k);
        let want: Vec<f32> = ids.iter().flat_map(|&i| w[i as usize * k..(i as usize + 1) * k].to_vec()).collect();
        assert!(rel(&got, &want) < 1e-7, "embedding type {}", dm.ty);
    }
}

#[test]
fn norm_and_swiglu_match_cpu() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(9);
    let (rows, k) = (5, 576);
    let (x, w, u) = (rng.vec(rows * k), rng.vec(k), rng.vec(rows * k));
    let (dx, dw, du) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap(), dev.upload(&u).unwrap());
    let out = dev.alloc::<f32>(rows * k).unwrap();
    unsafe { dev.rms_norm(dx.ptr, dw.ptr, 1e-5, k, rows, out.ptr).unwrap() };
    let mut want = vec![0.0; rows * k];
    for (xr, or) in x.chunks_exact(k).zip(want.chunks_exact_mut(k)) {
        rms_norm(xr, &w, 1e-5, or);
    }
    assert!(rel(&read(&dev, &out, rows * k), &want) < 1e-6);
    unsafe { dev.silu_mul(dx.ptr, du.ptr, rows * k).unwrap() };
    let mut g = x.clone();
    silu_mul(&mut g, &u);
    assert!(rel(&read(&dev, &dx, rows * k), &g) < 1e-6);
}

#[test]
fn rope_and_cache_write_match_cpu() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(13);
    let (nh, nkv, hd, n, pos0) = (6, 2, 64, 3, 40);
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
    for interleaved in [false, true] {
        let (q, k, v) = (rng.vec(n * nh * hd), rng.vec(n * nkv * hd), rng.vec(n * nkv * hd));
        let positions = [pos0 + 7, pos0, pos0 + 1000];
        let meta: Vec<i32> = std::iter::once(pos0 as i32).chain(positions.iter().map(|&p| p as i32)).collect();
        let mut table = Vec::new();
        for pos in 0..=pos0 + 1000 {
            let mut cs = vec![(0.0, 0.0); hd / 2];
            rope_angles(pos, &inv, &mut cs);
            table.extend(cs.iter().flat_map(|&(c, s)| [c, s]));
        }
        let (dq, dk, dv, dm, di) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap(), dev.upload(&v).unwrap(), dev.upload(&meta).unwrap(), dev.upload(&table).unwrap());
        let kvd = nkv * hd;
        let (kc, vc) = (dev.alloc::<f32>((pos0 + n) * kvd).unwrap(), dev.alloc::<f32>((pos0 + n) * kvd).unwrap());
        unsafe { dev.rope_kv(dq.ptr, dk.ptr, dv.ptr, kc.ptr, vc.ptr, dm.ptr, n, [nh, nkv, hd], di.ptr, interleaved).unwrap() };
        let (mut wq, mut wk) = (q.clone(), k.clone());
        for t in 0..n {
            let mut cs = vec![(0.0, 0.0); hd / 2];
            rope_angles(positions[t], &inv, &mut cs);
            rope(&mut wq[t * nh * hd..(t + 1) * nh * hd], hd, &cs, interleaved);
            rope(&mut wk[t * kvd..(t + 1) * kvd], hd, &cs, interleaved);
        }
        assert!(rel(&read(&dev, &dq, q.len()), &wq) < 1e-6, "q, interleaved {interleaved}");
        let kc = read(&dev, &kc, (pos0 + n) * kvd);
        let vc = read(&dev, &vc, (pos0 + n) * kvd);
        assert!(rel(&kc[pos0 * kvd..], &wk) < 1e-6, "k, interleaved {interleaved}");
        assert_eq!(&vc[pos0 * kvd..], &v[..]);
    }
}

#[test]
fn attention_matches_cpu_causal_tree_and_long() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(17);
    let (nh, nkv, hd) = (9, 3, 64);
    for (pos0, n, tree) in [(0, 7, false), (33, 5, false), (1000, 1, false), (20, 6, true), (300, 4, true)] {
        let seq = pos0 + n;
        let kvd = nkv * hd;
        let (q, kc, vc) = (rng.vec(n * nh * hd), rng.vec(seq * kvd), rng.vec(seq * kvd));
        // A tree: node i's parent is (i - 1) / 2.
        let mut mask = vec![false; n * seq];
        for i in 0..n {
            mask[i * seq..i * seq + pos0].fill(true);
            let mut a = i;
            loop {
                mask[i * seq + pos0 + a] = true;
                if a == 0 {
                    break;
                }
                a = (a - 1) / 2;
            }
        }
        let mut want = vec![0.0; n * nh * hd];
        let m = if tree { Mask::Explicit(&mask) } else { Mask::Causal { pos0 } };
        attention(&q, Cache::F32 { k: &kc, v: &vc }, seq, Shape { n_head: nh, n_kv_head: nkv, head_dim: hd }, m, 1.0 / (hd as f32).sqrt(), &mut want);
        let meta = [pos0 as i32];
        let bytes: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        let (dq, dk, dv, dm, dmask) = (dev.upload(&q).unwrap(), dev.upload(&kc).unwrap(), dev.upload(&vc).unwrap(), dev.upload(&meta).unwrap(), dev.upload(&bytes).unwrap());
        let nsplit = seq.div_ceil(ATT_SPAN) + 1; // one empty split too
        let po = dev.alloc::<f32>(n * nh * nsplit * hd).unwrap();
        let pml = dev.alloc::<f32>(n * nh * nsplit * 2).unwrap();
        let out = dev.alloc::<f32>(n * nh * hd).unwrap();
        let counters = dev.alloc::<i32>(n * nh).unwrap();
        let mask_ptr = tree.then_some(dmask.ptr);
        // Twice: the counters must be back at zero for the second pass.
        for pass in 0..2 {
            unsafe { dev.attention(dq.ptr, dk.ptr, dv.ptr, dm.ptr, n, [nh, nkv, hd], mask_ptr, nsplit, po.ptr, pml.ptr, counters.ptr, out.ptr).unwrap() };
            let e = rel(&read(&dev, &out, n * nh * hd), &want);
            assert!(e < 1e-5, "attention pos0 {pos0} n {n} tree {tree} pass {pass}: rel err {e}");
        }
    }
}

#[test]
fn argmax_takes_the_first_maximum() {
    let Some((dev, _turn)) = device() else { return };
    let mut rng = Rng(19);
    let (rows, k) = (3, 49152);
    let mut x = rng.vec(rows * k);
    x[k + 100] = 5.0;
    x[k + 40000] = 5.0;
    let dx = dev.upload(&x).unwrap();
    let out = dev.alloc::<i32>(rows).unwrap();
    unsafe { dev.argmax(dx.ptr, rows, k, out.ptr).unwrap() };
    let mut got = [0i32; 3];
    dev.read(&out, &mut got).unwrap();
    for (r, &g) in got.iter().enumerate() {
        let row = &x[r * k..(r + 1) * k];
        let want = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
        assert_eq!(g as usize, want, "row {r}");
    }
    assert_eq!(got[1], 100);
}

#[test]
fn keep_rows_moves_the_accepted_path() {
    let Some((dev, _turn)) = device() else { return };
    let kvd = 4;
    let rows: Vec<f32> = (0..10 * kvd).map(|i| i as f32).collect();
    let (kc, vc) = (dev.upload(&rows).unwrap(), dev.upload(&rows).unwrap());
    let keep = [0i32, 2, 5];
    let dk = dev.upload(&keep).unwrap();
    unsafe { dev.keep_rows(kc.ptr, vc.ptr, dk.ptr, 3, 4, kvd).unwrap() };
    let got = read(&dev, &kc, 10 * kvd);
    let mut want = rows.clone();
    for (i, &s) in keep.iter().enumerate() {
        let (d, s) = ((4 + i) * kvd, (4 + s as usize) * kvd);
        want.copy_within(s..s + kvd, d);
    }
    assert_eq!(got, want);
    assert_eq!(read(&dev, &vc, 10 * kvd), want);
}
