//! Deterministic test inputs shared by the kernels' unit tests.

/// `n` values in [-1, 1] from an xorshift sequence seeded by `seed`.
pub(crate) fn xorshift(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}
