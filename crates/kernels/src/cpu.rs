//! Run-time CPU feature detection, done once.

use std::sync::OnceLock;

/// The SIMD level the kernels may use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable scalar code only.
    Scalar,
    /// AVX2 with FMA (x86-64).
    Avx2,
}

/// The best ISA the kernels support on this CPU. `AUGUR_ISA=scalar` forces the portable path
/// (used by tests and to compare paths).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("AUGUR_ISA").map(|v| v == "scalar").unwrap_or(false) {
            return Isa::Scalar;
        }
        detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Scalar
}
