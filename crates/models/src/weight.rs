//! A projection weight with the copy of its blocks that the AVX-512 integer kernel reads
//! ([`augur_kernels::packed`]), built on the first CPU pass that uses it: a model moved to a GPU,
//! or run on a CPU without that kernel, never builds one. Once packed, the GGUF blocks' mapped
//! pages are released; what still reads them (an embedding row, a GPU upload, a writer) faults
//! in only what it reads.

use std::ops::Deref;
use std::sync::OnceLock;

use augur_core::Tensor;
use augur_kernels::matmul::{Matrix, Weights};
use augur_kernels::packed::{self, Packed};

use crate::Result;

/// A weight tensor and its packed copy.
pub(crate) struct Weight {
    tensor: Tensor,
    packed: OnceLock<Option<Packed>>,
}

impl Weight {
    pub(crate) fn new(tensor: Tensor) -> Weight {
        Weight { tensor, packed: OnceLock::new() }
    }

    /// The matrix for a CPU pass, with its packed copy where the kernel takes this block type
    /// and shape (packed now if this is the first such pass).
    pub(crate) fn cpu_matrix(&self) -> Result<Matrix<'_>> {
        let m = self.tensor.matrix()?;
        let p = self.packed.get_or_init(|| {
            let p = match m.weights {
                Weights::Quant(ty, raw) if packed::available() => Packed::new(ty, raw, m.rows, m.k),
                _ => None,
            };
            // Every CPU pass reads the packed copy from now on (prefill included), so the
            // mapped blocks need not stay resident: the process holds the weights once.
            if p.is_some() {
                self.tensor.release_pages();
            }
            p
        });
        Ok(match p {
            Some(p) => m.with_packed(p),
            None => m,
        })
    }
}

impl Deref for Weight {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}
