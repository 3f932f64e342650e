//! Cost-aware choice of the draft size: a small bandit over caps on the nodes per round.
//!
//! Whether speculation pays depends on the machine as much as on the drafter: on a CPU whose
//! integer kernel is compute bound, verifying b tokens costs nearly b decode steps, while on one
//! with spare bandwidth it costs little more than one. So the loop measures instead of assuming:
//! each round runs under a cap (0 = a plain decode step, then 1, 2, 4, … up to k) and credits the
//! cap with the round's throughput (tokens emitted per second of drafting and verification). It
//! tries the largest cap and plain decoding first, then uses the cap with the best running
//! average; every [`EXPLORE`]-th
//! round tries, in turn, the next smaller cap, plain decoding and the next larger cap, so a
//! changing text (a span to copy, then free prose) is noticed, while exploring never pays for a
//! far-off large draft (cycling through every cap cost about 10% on a CPU where large drafts are
//! slow) and trying plain decoding never costs more than plain decoding. The tokens produced
//! never depend on it: timing only decides how many are proposed.

/// Every this many rounds one cap is tried regardless of its average.
pub(crate) const EXPLORE: u32 = 16;

/// Weight of the newest round in a cap's running throughput.
const ALPHA: f64 = 0.25;

#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    caps: Vec<usize>,
    /// Running tokens/s per cap (`None` until tried).
    rate: Vec<Option<f64>>,
    round: u32,
    /// Which exploration comes next: 0 the smaller neighbour, 1 plain, 2 the larger neighbour.
    phase: u8,
    current: usize,
}

impl Throttle {
    /// Caps 0, 1, 2, 4, … and `k`.
    pub(crate) fn new(k: usize) -> Self {
        let mut caps = vec![0];
        let mut c = 1;
        while c < k {
            caps.push(c);
            c *= 2;
        }
        caps.push(k.max(1));
        let n = caps.len();
        Throttle { caps, rate: vec![None; n], round: 0, phase: 0, current: n - 1 }
    }

    /// The cap for this round.
    pub(crate) fn next(&mut self) -> usize {
        self.round += 1;
        let n = self.caps.len();
        let rate = |i: usize| self.rate[i].unwrap_or(f64::NEG_INFINITY);
        let best = (0..n).filter(|&i| self.rate[i].is_some()).max_by(|&a, &b| rate(a).total_cmp(&rate(b))).unwrap_or(n - 1);
        self.current = if self.round <= 2 {
            // The two extremes first: the drafter's own setting, then plain decoding.
            if self.round == 1 { n - 1 } else { 0 }
        } else if self.round.is_multiple_of(EXPLORE) {
            self.phase = (self.phase + 1) % 3;
            match self.phase {
                0 => best.saturating_sub(1),
                1 => 0,
                _ => (best + 1).min(n - 1),
            }
        } else {
            best
        };
        self.caps[self.current]
    }

    /// Credit this round's cap with `tokens` emitted in `secs`.
    pub(crate) fn record(&mut self, tokens: usize, secs: f64) {
        let r = tokens as f64 / secs.max(1e-9);
        let slot = &mut self.rate[self.current];
        *slot = Some(slot.map_or(r, |old| old + ALPHA * (r - old)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine where a round of b draft nodes costs `1 + cost·b` step-times and emits
    /// `1 + gain(b)` tokens: the throttle settles on the best cap and spends few rounds elsewhere.
    fn run(k: usize, cost: f64, gain: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut t = Throttle::new(k);
        (0..400)
            .map(|_| {
                let c = t.next();
                let tokens = 1.0 + gain(c);
                t.record(tokens.round() as usize, (1.0 + cost * c as f64) * 1e-2);
                c
            })
            .collect()
    }

    #[test]
    fn picks_plain_decoding_when_drafts_do_not_pay() {
        let caps = run(6, 0.6, |b| 0.1 * b as f64);
        let plain = caps[50..].iter().filter(|&&c| c == 0).count();
        assert!(plain as f64 > 0.85 * 350.0, "plain steps {plain} of 350");
    }

    #[test]
    fn picks_the_full_draft_when_it_pays() {
        let caps = run(6, 0.05, |b| b as f64);
        let full = caps[50..].iter().filter(|&&c| c == 6).count();
        assert!(full as f64 > 0.85 * 350.0, "full drafts {full} of 350");
        assert_eq!(Throttle::new(6).caps, vec![0, 1, 2, 4, 6]);
        assert_eq!(Throttle::new(1).caps, vec![0, 1]);
    }
}
