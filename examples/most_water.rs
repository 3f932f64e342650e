//! "Container with most water": given heights `h`, the largest `min(h[i], h[j]) * (j - i)`.
//!
//! Two pointers, O(n): start at both ends; the area is limited by the shorter wall, and moving
//! the taller wall inward can only shrink the width without raising that limit, so the shorter
//! wall moves. Every pair skipped this way is no better than one already seen.
//!
//! `cargo run -p augur-examples --example most_water -- 1 8 6 2 5 4 8 3 7` prints 49.

/// Largest water area between two of the `heights` (0 for fewer than two).
pub fn max_area(heights: &[u32]) -> u64 {
    let (mut i, mut j) = (0usize, heights.len().saturating_sub(1));
    let mut best = 0u64;
    while i < j {
        let (a, b) = (heights[i], heights[j]);
        best = best.max(a.min(b) as u64 * (j - i) as u64);
        if a < b {
            i += 1;
        } else {
            j -= 1;
        }
    }
    best
}

/// O(n²) twin: every pair.
pub fn max_area_brute(heights: &[u32]) -> u64 {
    let mut best = 0;
    for i in 0..heights.len() {
        for j in i + 1..heights.len() {
            best = best.max(heights[i].min(heights[j]) as u64 * (j - i) as u64);
        }
    }
    best
}

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let heights = if args.is_empty() { vec![1, 8, 6, 2, 5, 4, 8, 3, 7] } else { args };
    println!("{}", max_area(&heights));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_cases() {
        assert_eq!(max_area(&[1, 8, 6, 2, 5, 4, 8, 3, 7]), 49);
        assert_eq!(max_area(&[1, 1]), 1);
        assert_eq!(max_area(&[5]), 0);
        assert_eq!(max_area(&[]), 0);
    }

    #[test]
    fn largest_inputs() {
        // n = 10^5, heights up to 10^4: equal walls take the full width.
        assert_eq!(max_area(&vec![10_000; 100_000]), 10_000 * 99_999);
        // Two tall walls at the ends of low ground.
        let mut h = vec![1u32; 100_000];
        h[0] = 10_000;
        h[99_999] = 9_000;
        assert_eq!(max_area(&h), 9_000 * 99_999);
    }

    proptest! {
        #[test]
        fn two_pointers_equal_brute_force(h in proptest::collection::vec(0u32..=10_000, 0..200)) {
            prop_assert_eq!(max_area(&h), max_area_brute(&h));
        }
    }
}
