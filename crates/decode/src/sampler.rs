//! Choosing the next token from logits.
//!
//! Order of processing follows HF transformers' logits processors: repetition penalty, then
//! temperature, then top-k, top-p and min-p filters on the resulting distribution, then a draw.
//! Temperature 0 means greedy (argmax; the lowest id wins exact ties). [`Sampler::distribution`]
//! exposes the filtered distribution itself, so speculative decoding can apply the same filters to
//! the target and the draft before its rejection test.

use crate::rng::Rng;
use crate::{Error, Result};

/// Sampling settings. The defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's (0 = off).
    pub min_p: f32,
    /// HF-style penalty on tokens already in the context (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI-style penalties over the *generated* tokens: `logit -= presence · [count > 0] +
    /// frequency · count` (0 = off).
    pub presence_penalty: f32,
    /// OpenAI-style frequency penalty: subtracted once per earlier occurrence of a token.
    pub frequency_penalty: f32,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Check every setting is in range, naming the first one that is not.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Sampling(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature {} must be a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty {} must be > 0", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} {v} must be between -2 and 2"));
            }
        }
        Ok(())
    }

    /// Whether decoding is greedy (temperature 0): argmax, no randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub(crate) fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A sampler with its own RNG stream and reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// The settings it samples with.
    pub cfg: SamplerConfig,
    rng: Rng,
    logits: Vec<f32>,
    dist: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `cfg`, after [`SamplerConfig::validate`].
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Sampler { rng: Rng::new(cfg.seed), cfg, logits: Vec::new(), dist: Vec::new() })
    }

    /// The filtered next-token distribution as `(id, probability)` pairs (probabilities sum to 1),
    /// sorted by decreasing probability. For greedy settings: the argmax with probability 1.
    /// `history` is the whole context; the last `generated` of it were generated (for the
    /// OpenAI presence/frequency penalties, which count generated tokens only).
    pub fn distribution(&mut self, logits: &[f32], history: &[u32]) -> &[(u32, f32)] {
        self.distribution_with(logits, history, 0)
    }

    /// [`Sampler::distribution`] where the last `generated` tokens of `history` were generated.
    pub fn distribution_with(&mut self, logits: &[f32], history: &[u32], generated: usize) -> &[(u32, f32)] {
        let c = &self.cfg;
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        if c.repetition_penalty != 1.0 {
            for &t in history {
                if let Some(l) = self.logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / c.repetition_penalty } else { *l * c.repetition_penalty };
                }
            }
        }
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            let gen = &history[history.len() - generated.min(history.len())..];
            for (i, &t) in gen.iter().enumerate() {
                // Count each token once, at its first occurrence, to apply both penalties.
                if gen[..i].contains(&t) {
                    continue;
                }
                let count = gen.iter().filter(|&&u| u == t).count() as f32;
                if let Some(l) = self.logits.get_mut(t as usize) {
                    *l -= c.presence_penalty + c.frequency_penalty * count;
                }
            }
        }
        self.dist.clear();
        if c.is_greedy() {
            self.dist.push((argmax(&self.logits), 1.0));
            return &self.dist;
        }
        let inv_t = 1.0 / c.temperature;
        self.dist.extend(self.logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if c.top_k > 0 && c.top_k < self.dist.len() {
            self.dist.select_nth_unstable_by(c.top_k - 1, by_logit);
            self.dist.truncate(c.top_k);
        }
        self.dist.sort_unstable_by(by_logit);
        let m = self.dist[0].1;
        let mut sum = 0.0f64;
        for e in self.dist.iter_mut() {
            e.1 = (e.1 - m).exp();
            sum += e.1 as f64;
        }
        for e in self.dist.iter_mut() {
            e.1 = (e.1 as f64 / sum) as f32;
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0f32;
            let keep = self
                .dist
                .iter()
                .position(|e| {
                    acc += e.1;
                    acc >= c.top_p
                })
                .map_or(self.dist.len(), |i| i + 1);
            self.dist.truncate(keep);
        }
        if c.min_p > 0.0 {
            let floor = c.min_p * self.dist[0].1;
            let keep = self.dist.iter().take_while(|e| e.1 >= floor).count().max(1);
            self.dist.truncate(keep);
        }
        let total: f32 = self.dist.iter().map(|e| e.1).sum();
        for e in self.dist.iter_mut() {
            e.1 /= total;
        }
        &self.dist
    }

    /// Draw a token id from a distribution as returned by [`Sampler::distribution`].
    pub fn draw(&mut self, dist: &[(u32, f32)]) -> u32 {
        let u = self.rng.uniform() as f32;
        let mut acc = 0.0;
        for &(id, p) in dist {
            acc += p;
            if u < acc {
                return id;
            }
        }
        dist.last().map_or(0, |e| e.0)
    }

    /// The next token for these logits.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_with(logits, history, 0)
    }

    /// [`Sampler::sample`] where the last `generated` tokens of `history` were generated.
    pub fn sample_with(&mut self, logits: &[f32], history: &[u32], generated: usize) -> u32 {
        if self.cfg.is_greedy() && !self.cfg.penalizes() {
            return argmax(logits);
        }
        self.distribution_with(logits, history, generated);
        let dist = std::mem::take(&mut self.dist);
        let id = self.draw(&dist);
        self.dist = dist;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplerConfig)) -> Sampler {
        let mut c = SamplerConfig { temperature: 1.0, seed: 7, ..Default::default() };
        f(&mut c);
        Sampler::new(c).unwrap()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn filters_restrict_the_support() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, -5.0];
        assert_eq!(sampler(|c| c.top_k = 2).distribution(&logits, &[]).len(), 2);
        // softmax([2,1,0,-1,-5]) ≈ [.64,.24,.09,.03,.0006]: top-p 0.85 keeps 2, 0.9 keeps 3.
        assert_eq!(sampler(|c| c.top_p = 0.85).distribution(&logits, &[]).len(), 2);
        assert_eq!(sampler(|c| c.top_p = 0.9).distribution(&logits, &[]).len(), 3);
        // min-p 0.1 keeps tokens with p >= 0.064: ids 0, 1, 2.
        assert_eq!(sampler(|c| c.min_p = 0.1).distribution(&logits, &[]).len(), 3);
        let d = sampler(|c| c.top_k = 3).distribution(&logits, &[]).to_vec();
        assert!((d.iter().map(|e| e.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_lowers_seen_tokens() {
        let mut s = Sampler::new(SamplerConfig { repetition_penalty: 3.0, ..Default::default() }).unwrap();
        assert_eq!(s.sample(&[2.0, 1.0], &[0]), 1); // 2/3 < 1
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_probabilities() {
        let logits = [1.0f32, 0.0, -1.0];
        let draws = |seed| {
            let mut s = sampler(|c| c.seed = seed);
            (0..20000).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draws(1);
        assert_eq!(a, draws(1));
        assert_ne!(a, draws(2));
        let p = augur_kernels::reference::softmax(&logits);
        for (id, &pi) in p.iter().enumerate() {
            let f = a.iter().filter(|&&x| x == id as u32).count() as f32 / a.len() as f32;
            assert!((f - pi).abs() < 0.015, "token {id}: frequency {f} vs probability {pi}");
        }
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let cfg = SamplerConfig { presence_penalty: 1.0, frequency_penalty: 0.5, ..Default::default() };
        let mut s = Sampler::new(cfg).unwrap();
        // token 0 generated twice: 3.0 - 1.0 - 2*0.5 = 1.0 < 1.5
        assert_eq!(s.sample_with(&[3.0, 1.5], &[0, 0], 2), 1);
        // the same tokens in the prompt are not penalized
        assert_eq!(s.sample_with(&[3.0, 1.5], &[0, 0], 0), 0);
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Sampler::new(SamplerConfig { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplerConfig { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplerConfig { min_p: 2.0, ..Default::default() }).is_err());
    }
}
