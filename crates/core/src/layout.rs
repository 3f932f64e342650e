//! Strided layouts: which element of the storage sits at each index.

use rayon::prelude::*;

use crate::error::{invalid, Error, Result};

/// Shape, per-dimension strides (in elements) and the offset of element `[0, ..., 0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// Row-major contiguous layout.
    pub fn contiguous(shape: &[usize]) -> Self {
        let mut strides = vec![0; shape.len()];
        let mut s = 1;
        for (st, &d) in strides.iter_mut().zip(shape).rev() {
            *st = s;
            s *= d;
        }
        Layout { shape: shape.to_vec(), strides, offset: 0 }
    }

    /// Size of each dimension.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Elements to skip per step of each dimension.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Index of the first element in the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major with no gaps (checked without allocating: it sits on the decode hot path).
    pub fn is_contiguous(&self) -> bool {
        let mut want = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != want {
                return false;
            }
            want *= d;
        }
        true
    }

    /// Storage index of a multi-index.
    pub fn index(&self, idx: &[usize]) -> usize {
        self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
    }

    /// Storage offsets of the first element of every innermost row, in row-major order (one
    /// offset for a 0-d layout). Rows are `shape[last]` elements `strides[last]` apart.
    pub fn row_starts(&self) -> impl Iterator<Item = usize> + '_ {
        let outer = self.shape.len().saturating_sub(1);
        let n: usize = self.shape[..outer].iter().product();
        let n = if self.shape.last() == Some(&0) { 0 } else { n };
        let mut idx = vec![0usize; outer];
        let mut first = true;
        (0..n).map(move |_| {
            if !first {
                for d in (0..outer).rev() {
                    idx[d] += 1;
                    if idx[d] < self.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            first = false;
            self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
        })
    }

    /// Length and stride of the innermost rows (one element for a 0-d layout).
    fn row(&self) -> (usize, usize) {
        (self.shape.last().copied().unwrap_or(1), self.strides.last().copied().unwrap_or(0))
    }

    /// Storage indices of all elements in row-major order.
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        let (n, st) = self.row();
        self.row_starts().flat_map(move |r| (0..n).map(move |j| r + j * st))
    }

    /// The elements of `data` this layout selects, in row-major order, mapped through `f`
    /// (rows split over the thread pool when there are many: a head split or merge copies
    /// megabytes on every training step).
    pub fn gather<S: Copy + Sync, T: Send>(&self, data: &[S], f: impl Fn(S) -> T + Sync) -> Vec<T> {
        let (n, st) = self.row();
        if self.numel() >= 1 << 16 && n > 0 {
            let starts: Vec<usize> = self.row_starts().collect();
            let rows = (1 << 14) / n + 1;
            // SAFETY: chunk c holds the rows starts[c·rows..] whole, one start each: every
            // element is written.
            return unsafe {
                crate::ops::written(self.numel(), |out| {
                    out.par_chunks_mut(rows * n).zip(starts.par_chunks(rows)).for_each(|(o, rs)| {
                        for (o, &r) in o.chunks_mut(n).zip(rs) {
                            o.iter_mut().enumerate().for_each(|(j, o)| {
                                o.write(f(data[r + j * st]));
                            });
                        }
                    })
                })
            };
        }
        let mut out = Vec::with_capacity(self.numel());
        for r in self.row_starts() {
            if st == 1 {
                out.extend(data[r..r + n].iter().map(|&x| f(x)));
            } else {
                out.extend((0..n).map(|j| f(data[r + j * st])));
            }
        }
        out
    }

    /// Same elements, new shape; contiguous layouts only.
    pub fn reshape(&self, shape: &[usize]) -> Result<Layout> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::ShapeMismatch { op: "reshape", lhs: self.shape.clone(), rhs: shape.to_vec() });
        }
        if !self.is_contiguous() {
            return invalid("reshape", "layout is not contiguous; call contiguous() first");
        }
        Ok(Layout { offset: self.offset, ..Layout::contiguous(shape) })
    }

    /// Swap two dimensions.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Layout> {
        let r = self.shape.len();
        if a >= r || b >= r {
            return invalid("transpose", format!("dims ({a}, {b}) out of range for rank {r}"));
        }
        let mut l = self.clone();
        l.shape.swap(a, b);
        l.strides.swap(a, b);
        Ok(l)
    }

    /// Elements `start..start+len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        if dim >= self.shape.len() {
            return invalid("narrow", format!("dim {dim} out of range for rank {}", self.shape.len()));
        }
        if start.checked_add(len).is_none_or(|e| e > self.shape[dim]) {
            return invalid("narrow", format!("range {start}..{} exceeds size {} of dim {dim}", start + len, self.shape[dim]));
        }
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Ok(l)
    }

    /// Broadcast to `shape` (numpy rules: align right, size-1 dims stretch with stride 0).
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Layout> {
        if shape.len() < self.shape.len() {
            return Err(Error::ShapeMismatch { op: "broadcast", lhs: self.shape.clone(), rhs: shape.to_vec() });
        }
        let pad = shape.len() - self.shape.len();
        let mut strides = vec![0; shape.len()];
        for (i, &d) in shape.iter().enumerate() {
            if i < pad {
                continue;
            }
            let (sd, ss) = (self.shape[i - pad], self.strides[i - pad]);
            if sd == d {
                strides[i] = ss;
            } else if sd != 1 {
                return Err(Error::ShapeMismatch { op: "broadcast", lhs: self.shape.clone(), rhs: shape.to_vec() });
            }
        }
        Ok(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }
}

/// The broadcast shape of two shapes.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let get = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(Error::ShapeMismatch { op, lhs: a.to_vec(), rhs: b.to_vec() }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(1usize..5, 1..4)
    }

    /// Large layouts gather on the thread pool; the result is the index walk's, in order.
    #[test]
    fn large_gathers_follow_the_indices() {
        for l in [Layout::contiguous(&[4, 300, 6, 32]).transpose(1, 2).unwrap(), Layout::contiguous(&[700, 130]).transpose(0, 1).unwrap()] {
            let data: Vec<u32> = (0..l.numel() as u32).collect();
            assert!(l.numel() >= 1 << 16);
            let want: Vec<u64> = l.indices().map(|i| data[i] as u64 * 3).collect();
            assert_eq!(l.gather(&data, |x| x as u64 * 3), want);
        }
    }

    proptest! {
        #[test]
        fn contiguous_indices_are_sequential(s in shape()) {
            let l = Layout::contiguous(&s);
            let idx: Vec<usize> = l.indices().collect();
            prop_assert_eq!(idx, (0..l.numel()).collect::<Vec<_>>());
        }

        #[test]
        fn transpose_twice_is_identity(s in shape(), a in 0usize..3, b in 0usize..3) {
            let l = Layout::contiguous(&s);
            let (a, b) = (a % s.len(), b % s.len());
            prop_assert_eq!(l.transpose(a, b).unwrap().transpose(a, b).unwrap(), l);
        }

        #[test]
        fn transpose_maps_indices(r in 1usize..6, c in 1usize..6) {
            let l = Layout::contiguous(&[r, c]).transpose(0, 1).unwrap();
            for i in 0..c { for j in 0..r { prop_assert_eq!(l.index(&[i, j]), j * c + i); } }
        }

        #[test]
        fn narrow_selects_the_range(s in shape(), d in 0usize..3, a in 0usize..4, n in 0usize..4) {
            let l = Layout::contiguous(&s);
            let d = d % s.len();
            match l.narrow(d, a, n) {
                Ok(v) => {
                    prop_assert!(a + n <= s[d]);
                    let full: Vec<Vec<usize>> = multi(&s);
                    let want: Vec<usize> = full.iter().filter(|ix| ix[d] >= a && ix[d] < a + n).map(|ix| l.index(ix)).collect();
                    prop_assert_eq!(v.indices().collect::<Vec<_>>(), want);
                }
                Err(_) => prop_assert!(a + n > s[d]),
            }
        }
    }

    fn multi(s: &[usize]) -> Vec<Vec<usize>> {
        let mut out = vec![vec![]];
        for &d in s {
            out = out.into_iter().flat_map(|p| (0..d).map(move |i| { let mut q = p.clone(); q.push(i); q })).collect();
        }
        out
    }

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast_shape("t", &[3, 1], &[4]).unwrap(), vec![3, 4]);
        assert!(broadcast_shape("t", &[3, 2], &[4]).is_err());
        let l = Layout::contiguous(&[3, 1]).broadcast_to(&[2, 3, 4]).unwrap();
        assert_eq!(l.index(&[1, 2, 3]), 2);
    }
}
