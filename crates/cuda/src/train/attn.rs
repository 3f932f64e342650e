//! Attention on the device: 16-bit inputs with heads of 64 or 128 (and no score bias or ALiBi)
//! through the tensor-core FlashAttention of `flash.cu`; everything else through `train.cu`'s
//! general kernels in f32 or f64 (one block per query row, its scores in shared memory).

use augur_core::device::AttentionGrads;
use augur_core::{AttentionMask, DType, Tensor};
use augur_kernels::flash::Shape;
use cudarc::driver::{DeviceRepr, PushKernelArg};

use super::{core, cuda_err, elem_size, Buffer, Cuda, ATTN_SMEM};
use crate::flash::{Dtype, Flash, Ptrs};

/// `AttnArgs` in train.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AttnArgs {
    q: u64,
    k: u64,
    v: u64,
    bias: u64,
    out: u64,
    lse: u64,
    dout: u64,
    allow: u64,
    alibi: u64,
    o: u64,
    l: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dbias: u64,
    batch: i32,
    heads: i32,
    kv_heads: i32,
    q_len: i32,
    k_len: i32,
    dim: i32,
    causal: i32,
    pad: i32,
    scale: f64,
}

// SAFETY: `AttnArgs` is `repr(C)` plain data matching the kernels' parameter.
unsafe impl DeviceRepr for AttnArgs {}

fn scale(s: &Shape, m: &AttentionMask) -> f64 {
    m.scale.map_or(1.0 / (s.dim as f64).sqrt(), |x| x as f64)
}

/// The tensor-core type of a call the FlashAttention kernels take, if they do.
fn fast(be: &Cuda, s: &Shape, ts: &[&Tensor], bias: Option<&Tensor>, m: &AttentionMask) -> Option<Dtype> {
    let ty = match ts[0].dtype() {
        DType::BF16 => Dtype::Bf16,
        DType::F16 => Dtype::F16,
        _ => return None,
    };
    let same = ts.iter().all(|t| t.dtype() == ts[0].dtype());
    (same && bias.is_none() && m.alibi.is_none() && Flash::supports(s, scale(s, m) as f32) && be.flash().is_ok()).then_some(ty)
}

fn allow(be: &Cuda, m: &AttentionMask) -> core::Result<Option<Buffer>> {
    m.allow.as_ref().map(|a| be.upload_raw(&a.iter().map(|&x| u8::from(x)).collect::<Vec<_>>())).transpose()
}

fn args(s: &Shape, m: &AttentionMask) -> AttnArgs {
    AttnArgs {
        batch: s.batch as i32,
        heads: s.heads as i32,
        kv_heads: s.kv_heads as i32,
        q_len: s.q_len as i32,
        k_len: s.k_len as i32,
        dim: s.dim as i32,
        causal: i32::from(m.causal),
        scale: scale(s, m),
        ..Default::default()
    }
}

fn general_smem(s: &Shape, ty: DType, rows: usize) -> core::Result<usize> {
    let bytes = rows * s.k_len * elem_size(ty);
    if bytes > ATTN_SMEM {
        return Err(cuda_err(format!(
            "attention over {} keys in {} is past the general kernel's shared memory; use bf16 autocast with heads of 64 or 128 (FlashAttention)",
            s.k_len,
            ty.name()
        )));
    }
    Ok(bytes)
}

pub(super) fn forward(be: &Cuda, s: &Shape, (q, k, v): (&Tensor, &Tensor, &Tensor), bias: Option<&Tensor>, m: &AttentionMask) -> core::Result<(Tensor, Tensor)> {
    let rows = s.batch * s.heads * s.q_len;
    let allow = allow(be, m)?;
    if let Some(ty) = fast(be, s, &[q, k, v], bias, m) {
        let dt = q.dtype();
        let (q, k, v) = (be.dense(q, dt)?, be.dense(k, dt)?, be.dense(v, dt)?);
        let (o, lse) = (be.alloc(dt, q.numel())?, be.alloc(DType::F32, rows)?);
        let p = Ptrs { q: Cuda::ptr(&q)?, k: Cuda::ptr(&k)?, v: Cuda::ptr(&v)?, o: o.ptr, lse: lse.ptr, allow: allow.as_ref().map_or(0, |a| a.ptr), ..Default::default() };
        // SAFETY: dense buffers of the shape `s` was checked against; `supports` holds.
        unsafe { be.flash()?.forward_ptrs(s, m.causal, ty, scale(s, m) as f32, &p) }.map_err(cuda_err)?;
        return Ok((Cuda::tensor(o, q.shape())?, Cuda::tensor(lse, &[s.batch, s.heads, s.q_len])?));
    }
    let (ty, i) = Cuda::compute(&[q, k, v]);
    let (q, k, v) = (be.dense(q, ty)?, be.dense(k, ty)?, be.dense(v, ty)?);
    let bias = bias.map(|b| be.dense(b, ty)).transpose()?;
    let alibi = m.alibi.as_ref().map(|a| be.upload_raw(crate::ops::bytes_of(a))).transpose()?;
    let (o, lse) = (be.alloc(ty, q.numel())?, be.alloc(ty, rows)?);
    let mut a = args(s, m);
    (a.q, a.k, a.v, a.o, a.l) = (Cuda::ptr(&q)?, Cuda::ptr(&k)?, Cuda::ptr(&v)?, o.ptr, lse.ptr);
    a.bias = bias.as_ref().map_or(Ok(0), Cuda::ptr)?;
    a.allow = allow.as_ref().map_or(0, |b| b.ptr);
    a.alibi = alibi.as_ref().map_or(0, |b| b.ptr);
    let mut b = be.builder(&be.k.attn_fwd[i]);
    b.arg(&a);
    Cuda::run(&mut b, Cuda::rows(rows, 128, general_smem(s, ty, 1)?))?;
    Ok((Cuda::tensor(o, q.shape())?, Cuda::tensor(lse, &[s.batch, s.heads, s.q_len])?))
}

pub(super) fn backward(
    be: &Cuda,
    s: &Shape,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    bias: Option<&Tensor>,
    m: &AttentionMask,
    (out, lse, g): (&Tensor, &Tensor, &Tensor),
) -> core::Result<AttentionGrads> {
    let rows = s.batch * s.heads * s.q_len;
    let allow = allow(be, m)?;
    if let Some(ty) = fast(be, s, &[q, k, v], bias, m) {
        let dt = q.dtype();
        let (q, k, v, out, g) = (be.dense(q, dt)?, be.dense(k, dt)?, be.dense(v, dt)?, be.dense(out, dt)?, be.dense(g, dt)?);
        let lse = be.dense(lse, DType::F32)?;
        let (delta, dq_acc) = (be.alloc(DType::F32, rows)?, be.zeros(DType::F32, q.numel())?);
        let (dq, dk, dv) = (be.alloc(dt, q.numel())?, be.alloc(dt, k.numel())?, be.alloc(dt, v.numel())?);
        let p = Ptrs {
            q: Cuda::ptr(&q)?,
            k: Cuda::ptr(&k)?,
            v: Cuda::ptr(&v)?,
            o: Cuda::ptr(&out)?,
            lse: Cuda::ptr(&lse)?,
            allow: allow.as_ref().map_or(0, |a| a.ptr),
            dout: Cuda::ptr(&g)?,
            delta: delta.ptr,
            dq_acc: dq_acc.ptr,
            dq: dq.ptr,
            dk: dk.ptr,
            dv: dv.ptr,
        };
        // SAFETY: dense buffers of the shape `s` was checked against, `dq_acc` zeroed.
        unsafe { be.flash()?.backward_ptrs(s, m.causal, ty, scale(s, m) as f32, &p) }.map_err(cuda_err)?;
        return Ok((Cuda::tensor(dq, q.shape())?, Cuda::tensor(dk, k.shape())?, Cuda::tensor(dv, v.shape())?, None));
    }
    let (ty, i) = Cuda::compute(&[q, k, v, out, g]);
    let d = |t: &Tensor| be.dense(t, ty);
    let (q, k, v, out, lse, g) = (d(q)?, d(k)?, d(v)?, d(out)?, d(lse)?, d(g)?);
    let bias = bias.map(d).transpose()?;
    let alibi = m.alibi.as_ref().map(|a| be.upload_raw(crate::ops::bytes_of(a))).transpose()?;
    let (dq, dk, dv) = (be.alloc(ty, q.numel())?, be.zeros(ty, k.numel())?, be.zeros(ty, v.numel())?);
    let dbias = bias.as_ref().map(|_| be.zeros(ty, s.heads * s.q_len * s.k_len)).transpose()?;
    let mut a = args(s, m);
    (a.q, a.k, a.v, a.out, a.lse, a.dout) = (Cuda::ptr(&q)?, Cuda::ptr(&k)?, Cuda::ptr(&v)?, Cuda::ptr(&out)?, Cuda::ptr(&lse)?, Cuda::ptr(&g)?);
    (a.dq, a.dk, a.dv) = (dq.ptr, dk.ptr, dv.ptr);
    a.bias = bias.as_ref().map_or(Ok(0), Cuda::ptr)?;
    a.dbias = dbias.as_ref().map_or(0, |b| b.ptr);
    a.allow = allow.as_ref().map_or(0, |b| b.ptr);
    a.alibi = alibi.as_ref().map_or(0, |b| b.ptr);
    let mut b = be.builder(&be.k.attn_bwd[i]);
    b.arg(&a);
    Cuda::run(&mut b, Cuda::rows(rows, 128, general_smem(s, ty, 2)?))?;
    Ok((
        Cuda::tensor(dq, q.shape())?,
        Cuda::tensor(dk, k.shape())?,
        Cuda::tensor(dv, v.shape())?,
        dbias.map(|b| Cuda::tensor(b, &[s.heads, s.q_len, s.k_len])).transpose()?,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn argument_layout_matches_train_cu() {
        // 15 pointers, 8 ints, a double.
        assert_eq!(std::mem::size_of::<super::AttnArgs>(), 15 * 8 + 8 * 4 + 8);
        assert_eq!(std::mem::offset_of!(super::AttnArgs, scale), 15 * 8 + 8 * 4);
    }
}
