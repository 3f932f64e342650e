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

/// The vector width [`multiversion!`] functions run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// Baseline code (SSE2 on x86-64).
    Base,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 F with AVX2 and FMA.
    Avx512,
}

/// The widest [`SimdLevel`] of this CPU, detected once (`AUGUR_ISA=scalar` gives `Base`).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx2 {
            return if is_x86_feature_detected!("avx512f") { SimdLevel::Avx512 } else { SimdLevel::Avx2 };
        }
        SimdLevel::Base
    })
}

/// Define a function whose body is compiled three times, for baseline x86-64, AVX2 + FMA and
/// AVX-512, and run at [`simd_level`]: plain loops over slices in it vectorize at the CPU's
/// width although the crate targets baseline x86-64. The body is an `#[inline(always)]` inner
/// function, so the compiler cannot leave it outside the target-feature copies (a closure
/// passed to such a function stays a separate, baseline function once it is large). Generic
/// parameters go in square brackets, `fn name[T: Real](x: &mut [T]) { … }`, and are inferred
/// from the arguments.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident $([$($gen:tt)*])? ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$($gen)*>)? ($($a: $t),*) $(-> $r)? {
            $(#[$m])*
            #[inline(always)]
            fn body $(<$($gen)*>)? ($($a: $t),*) $(-> $r)? $body
            $(#[$m])*
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512 $(<$($gen)*>)? ($($a: $t),*) $(-> $r)? {
                body($($a),*)
            }
            $(#[$m])*
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2 $(<$($gen)*>)? ($($a: $t),*) $(-> $r)? {
                body($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            match $crate::cpu::simd_level() {
                // SAFETY: simd_level() detected the features each copy enables.
                $crate::cpu::SimdLevel::Avx512 => return unsafe { avx512($($a),*) },
                $crate::cpu::SimdLevel::Avx2 => return unsafe { avx2($($a),*) },
                $crate::cpu::SimdLevel::Base => {}
            }
            body($($a),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::real::Real;

    crate::multiversion! {
        /// Σ e^x over 16 lanes: a loop the vector copies must compute like the baseline one.
        fn exp_sum[T: Real](x: &[T]) -> T {
            let mut acc = [T::ZERO; 16];
            for c in x.chunks_exact(16) {
                for l in 0..16 {
                    acc[l] += c[l].fast_exp();
                }
            }
            acc.into_iter().fold(T::ZERO, |a, b| a + b)
        }
    }

    /// The copy chosen for this CPU agrees with libm (f32 and f64 instances of one definition).
    #[test]
    fn multiversioned_functions_compute_their_body() {
        let x: Vec<f64> = (0..160).map(|i| (i as f64 - 80.0) / 16.0).collect();
        let want: f64 = x.iter().map(|v| v.exp()).sum();
        assert!((exp_sum(&x) - want).abs() < 1e-12 * want);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        assert!(((exp_sum(&x32) as f64) - want).abs() < 1e-5 * want);
    }
}
