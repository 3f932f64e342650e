//! `Lay`: a strided view as the kernels of train.cu take it, and the tests that pick their
//! eight-a-thread paths.

use augur_core::Layout;
use cudarc::driver::DeviceRepr;

use super::core;

/// Most dimensions a view passed to the kernels may keep after merging (`MAX_RANK` in train.cu).
pub(super) const MAX_RANK: usize = 8;

/// `Lay` in train.cu: a strided view of up to eight dimensions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Lay {
    pub(super) shape: [i64; MAX_RANK],
    pub(super) stride: [i64; MAX_RANK],
    pub(super) offset: i64,
    pub(super) rank: i32,
    pub(super) pad: i32,
}

// SAFETY: `Lay` is `repr(C)` plain data matching the kernels' parameter.
unsafe impl DeviceRepr for Lay {}

impl Lay {
    /// Flat and starting on a multiple of eight elements: the kernels then move eight elements
    /// a thread (`flat8` in train.cu).
    pub(super) fn flat8(&self) -> bool {
        self.rank == 1 && self.stride[0] == 1 && self.offset % 8 == 0
    }

    /// Rows of `d` elements that are contiguous runs on multiples of eight, `d / 2` a multiple of
    /// eight: RoPE then turns eight pairs a thread (`rope_rows8` in train.cu).
    pub(super) fn rope_rows8(&self, d: usize) -> bool {
        let r = self.rank as usize;
        d % 16 == 0 && r > 0 && self.stride[r - 1] == 1 && self.shape[r - 1] % d as i64 == 0 && self.offset % 8 == 0 && self.stride[..r - 1].iter().all(|s| s % 8 == 0)
    }

    /// The layouts (of one shape) with adjacent dimensions merged where all of them allow it,
    /// size-1 dimensions dropped (fewer divisions per element in the kernels).
    pub(super) fn merged(ls: &[&Layout]) -> core::Result<Vec<Lay>> {
        let shape = ls[0].shape();
        let mut dims: Vec<(usize, Vec<usize>)> = vec![];
        for (d, &len) in shape.iter().enumerate() {
            if len == 1 {
                continue;
            }
            let strides: Vec<usize> = ls.iter().map(|l| l.strides()[d]).collect();
            match dims.last_mut() {
                Some((size, st)) if st.iter().zip(&strides).all(|(&outer, &inner)| outer == inner * len) => {
                    *size *= len;
                    *st = strides;
                }
                _ => dims.push((len, strides)),
            }
        }
        if dims.len() > MAX_RANK {
            return Err(core::Error::Invalid { op: "cuda", msg: format!("views of more than {MAX_RANK} dimensions that cannot be merged: {shape:?}") });
        }
        if dims.is_empty() {
            dims.push((1, vec![1; ls.len()]));
        }
        Ok(ls
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut lay = Lay { offset: l.offset() as i64, rank: dims.len() as i32, ..Default::default() };
                for (d, (size, st)) in dims.iter().enumerate() {
                    lay.shape[d] = *size as i64;
                    lay.stride[d] = st[i] as i64;
                }
                lay
            })
            .collect())
    }
}
