//! FlashAttention on the device against the CPU's (`augur_kernels::flash`, in f32 on the same
//! 16-bit-rounded inputs), forward and backward, over causal, prefix-offset, explicit-mask and
//! grouped-query shapes and both element types.

use augur_kernels::flash::{backward, forward, Mask, Shape};

use crate::device::{arch, compile_uncached};
use crate::flash::{Attention, Dtype, Flash, Io, FLASH};
use crate::tests::{device, rel, Rng};

#[test]
fn flash_kernels_compile_for_hopper() {
    match compile_uncached(&FLASH, &arch(9, 0)) {
        Ok(ptx) => {
            let src = ptx.to_src();
            assert!(src.contains("fa_bwd_d128_bf16") && src.contains("wgmma.mma_async"), "the Hopper forward pass is missing");
        }
        Err(crate::Error::NoNvrtc) => eprintln!("skipped: NVRTC is not installed"),
        Err(e) => panic!("{e}"),
    }
}

struct Case {
    shape: Shape,
    causal: bool,
    /// Keep each (query, key) pair with this probability through an explicit mask.
    allow: Option<f32>,
}

fn cases() -> Vec<Case> {
    let s = |batch, heads, kv_heads, q_len, k_len, dim| Shape { batch, heads, kv_heads, q_len, k_len, dim };
    vec![
        // Tile-sized, and ragged lengths that end inside a tile.
        Case { shape: s(1, 2, 2, 128, 128, 64), causal: true, allow: None },
        Case { shape: s(2, 4, 2, 100, 100, 128), causal: true, allow: None },
        // A prefix in the cache: 37 new queries after 163 cached keys.
        Case { shape: s(1, 3, 1, 37, 200, 128), causal: true, allow: None },
        Case { shape: s(1, 2, 1, 70, 150, 64), causal: false, allow: None },
        // A tree-like mask with rows that see nothing.
        Case { shape: s(1, 2, 2, 65, 90, 64), causal: false, allow: Some(0.3) },
        // Several 128 x 128 tiles of the Hopper forward pass: the diagonal, a ragged last
        // tile, a prefix, an explicit mask.
        Case { shape: s(1, 2, 1, 300, 300, 128), causal: true, allow: None },
        Case { shape: s(1, 2, 2, 140, 397, 128), causal: true, allow: None },
        Case { shape: s(1, 1, 1, 200, 260, 128), causal: false, allow: Some(0.5) },
    ]
}

/// Round-trip through the 16-bit type: the CPU reference sees exactly the device's inputs.
fn rounded(rng: &mut Rng, n: usize, ty: Dtype) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = rng.vec(n).iter().map(|&x| ty.encode(x)).collect();
    let vals = bits.iter().map(|&b| ty.decode(b)).collect();
    (bits, vals)
}

fn decode(ty: Dtype, bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| ty.decode(b)).collect()
}

#[test]
fn flash_attention_matches_cpu_forward_and_backward() {
    let Some((dev, _turn)) = device() else { return };
    let flash = Flash::new(&dev).unwrap();
    let mut rng = Rng(11);
    for ty in [Dtype::Bf16, Dtype::F16] {
        for c in cases() {
            let s = c.shape;
            let scale = 1.0 / (s.dim as f32).sqrt();
            let (nq, nk) = (s.batch * s.heads * s.q_len * s.dim, s.batch * s.kv_heads * s.k_len * s.dim);
            let (qb, q) = rounded(&mut rng, nq, ty);
            let (kb, k) = rounded(&mut rng, nk, ty);
            let (vb, v) = rounded(&mut rng, nk, ty);
            let (db, dout) = rounded(&mut rng, nq, ty);
            let allow: Option<Vec<bool>> = c.allow.map(|p| (0..s.q_len * s.k_len).map(|_| rng.next() * 0.5 + 0.5 < p).collect());
            let mask = Mask { causal: c.causal, allow: allow.as_deref(), bias: None, alibi: None };

            let mut out = vec![0f32; nq];
            let mut lse = vec![0f32; s.batch * s.heads * s.q_len];
            forward(&s, &mask, scale, &q, &k, &v, &mut out, &mut lse);
            let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
            backward(&s, &mask, scale, (&q, &k, &v), (&out, &lse, &dout), (&mut dq, &mut dk, &mut dv), None);

            let mut a = Attention::new(&flash, s, c.causal, ty, scale).unwrap();
            a.write(&flash, Io::Q, &qb).unwrap();
            a.write(&flash, Io::K, &kb).unwrap();
            a.write(&flash, Io::V, &vb).unwrap();
            a.write(&flash, Io::DOut, &db).unwrap();
            a.set_allow(&flash, allow.as_deref()).unwrap();
            a.forward(&flash).unwrap();
            a.backward(&flash).unwrap();
            let what = format!("{ty:?} {s:?} causal {} mask {:?}", c.causal, c.allow);
            let o_err = rel(&decode(ty, &a.read(&flash, Io::O).unwrap()), &out);
            assert!(o_err < 1e-2, "{what}: output off by {o_err:.2e}");
            let got_lse = a.read_lse(&flash).unwrap();
            for (g, w) in got_lse.iter().zip(&lse) {
                assert!(g == w || (g - w).abs() < 2e-3 * w.abs().max(1.0), "{what}: lse {g} vs {w}");
            }
            for (io, want) in [(Io::DQ, &dq), (Io::DK, &dk), (Io::DV, &dv)] {
                let err = rel(&decode(ty, &a.read(&flash, io).unwrap()), want);
                assert!(err < 2e-2, "{what}: {io:?} off by {err:.2e}");
            }
        }
    }
}

#[test]
fn flash_attention_refuses_what_it_cannot_do() {
    let Some((dev, _turn)) = device() else { return };
    let flash = Flash::new(&dev).unwrap();
    let s = Shape { batch: 1, heads: 2, kv_heads: 1, q_len: 8, k_len: 8, dim: 96 };
    let e = Attention::new(&flash, s, true, Dtype::Bf16, 0.1).err().unwrap().to_string();
    assert!(e.contains("width 64 or 128"), "{e}");
    let s = Shape { dim: 64, q_len: 9, ..s };
    let e = Attention::new(&flash, s, true, Dtype::Bf16, 0.1).err().unwrap().to_string();
    assert!(e.contains("at least as many keys"), "{e}");
    let e = Attention::new(&flash, Shape { q_len: 8, ..s }, true, Dtype::Bf16, -0.1).err().unwrap().to_string();
    assert!(e.contains("positive"), "{e}");
    let mut a = Attention::new(&flash, Shape { q_len: 8, ..s }, true, Dtype::Bf16, 0.1).unwrap();
    assert!(a.set_allow(&flash, Some(&[true; 5])).is_err());
    assert!(a.write(&flash, Io::Q, &[0; 3]).is_err());
}
