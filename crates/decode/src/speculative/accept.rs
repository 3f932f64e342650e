//! Acceptance: which path of the tree the target keeps, and the token it adds after it.
//!
//! Greedy (temperature 0): follow the child whose token is the target's argmax; the first
//! mismatch yields the argmax as the bonus token. Sampling: at each node, try the children in
//! order; child `x` drawn from `q` is accepted with probability `min(1, p(x) / q(x))`; on
//! rejection the target distribution becomes `norm(max(0, p - q))` and the next sibling is tried;
//! if none is accepted the bonus is drawn from what remains. A deterministic proposal has
//! `q = δ_x`. This keeps the output distributed exactly as the target's (Leviathan et al. 2023;
//! the multi-candidate form as in SpecInfer), with the sampling filters applied to `p` and `q`
//! alike.

use crate::rng::Rng;
use crate::sampler::Sampler;

use super::tree::{Compiled, Tree};

/// The outcome of one verification.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Accepted node rows of the pass (1-based: row 0 is the pending token), root to leaf.
    pub rows: Vec<usize>,
    /// Their tokens.
    pub tokens: Vec<u32>,
    /// The target's own next token after the accepted path.
    pub bonus: u32,
}

/// A dense probability vector over the vocabulary, reused across steps.
fn densify(dist: &[(u32, f32)], dense: &mut [f32]) {
    dense.fill(0.0);
    for &(id, p) in dist {
        dense[id as usize] = p;
    }
}

fn draw(dense: &[f32], rng: &mut Rng) -> u32 {
    let total: f32 = dense.iter().sum();
    let u = rng.uniform() as f32 * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in dense.iter().enumerate() {
        if p > 0.0 {
            acc += p;
            last = i;
            if u < acc {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Walk the tree with the target's logits (`[rows, vocab]`) and pick the accepted path.
/// `history` is the accepted context, whose last `generated` tokens were generated (for the
/// penalties, applied exactly as plain decoding applies them).
#[allow(clippy::too_many_arguments)]
pub fn accept(
    tree: &Tree,
    compiled: &Compiled,
    logits: &[f32],
    vocab: usize,
    history: &[u32],
    generated: usize,
    sampler: &mut Sampler,
    rng: &mut Rng,
    dense: &mut Vec<f32>,
) -> Accepted {
    let mut rows = Vec::new();
    let mut tokens = Vec::new();
    let mut hist = history.to_vec();
    let mut row = 0;
    let greedy = sampler.cfg.is_greedy();
    dense.resize(vocab, 0.0);
    loop {
        let l = &logits[row * vocab..(row + 1) * vocab];
        let kids = &compiled.children[row];
        if greedy {
            let best = sampler.distribution_with(l, &hist, generated + tokens.len())[0].0;
            match kids.iter().find(|&&c| compiled.tokens[c] == best) {
                Some(&c) => {
                    rows.push(c);
                    tokens.push(best);
                    hist.push(best);
                    row = c;
                    continue;
                }
                None => return Accepted { rows, tokens, bonus: best },
            }
        }
        densify(sampler.distribution_with(l, &hist, generated + tokens.len()), dense);
        let mut next = None;
        for &c in kids {
            let x = compiled.tokens[c];
            let q = tree.q[c - 1].as_deref();
            let qx = q.map_or(1.0, |q| q.iter().find(|e| e.0 == x).map_or(0.0, |e| e.1));
            let px = dense[x as usize];
            let total: f32 = dense.iter().sum();
            if qx > 0.0 && (rng.uniform() as f32) * qx * total < px {
                next = Some(c);
                break;
            }
            // Rejected: p <- max(0, p - q) (unnormalised; draws renormalise).
            match q {
                None => dense[x as usize] = 0.0,
                Some(q) => {
                    let scale = total;
                    for &(id, qp) in q {
                        let v = &mut dense[id as usize];
                        *v = (*v - qp * scale).max(0.0);
                    }
                }
            }
            if dense.iter().all(|&v| v <= 0.0) {
                break;
            }
        }
        match next {
            Some(c) => {
                let x = compiled.tokens[c];
                rows.push(c);
                tokens.push(x);
                hist.push(x);
                row = c;
            }
            None => {
                let bonus = if dense.iter().any(|&v| v > 0.0) { draw(dense, rng) } else { sampler.distribution_with(l, &hist, generated + tokens.len())[0].0 };
                return Accepted { rows, tokens, bonus };
            }
        }
    }
}

/// Medusa's typical acceptance: a candidate `x` is accepted when the target gives it probability
/// above `min(eps, delta · exp(-H(p)))`, `H` the entropy of the target's (filtered) distribution.
/// Not lossless: the output follows a relaxed distribution (more confident where the target is).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Typical {
    /// Hard threshold (Medusa's `posterior_threshold`, 0.09 there).
    pub eps: f32,
    /// Entropy-scaled threshold factor (Medusa's `posterior_alpha`, 0.3 there).
    pub delta: f32,
}

impl std::str::FromStr for Typical {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("--typical `{s}`: expected EPS,DELTA, two numbers in (0, 1], e.g. 0.09,0.3");
        let (a, b) = s.split_once(',').ok_or_else(bad)?;
        let (eps, delta): (f32, f32) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if !(eps > 0.0 && eps <= 1.0 && delta > 0.0 && delta <= 1.0) {
            return Err(bad());
        }
        Ok(Typical { eps, delta })
    }
}

/// Walk the tree with typical acceptance: at each node take the first child (proposal order)
/// that passes [`Typical`]'s threshold; the bonus token is sampled from the target as usual. With
/// a greedy sampler the filtered distribution is the argmax alone, so this equals exact greedy
/// verification.
pub fn accept_typical(
    compiled: &Compiled,
    logits: &[f32],
    vocab: usize,
    history: &[u32],
    generated: usize,
    sampler: &mut Sampler,
    t: &Typical,
) -> Accepted {
    let (mut rows, mut tokens, mut hist) = (Vec::new(), Vec::new(), history.to_vec());
    let mut row = 0;
    loop {
        let l = &logits[row * vocab..(row + 1) * vocab];
        let dist = sampler.distribution_with(l, &hist, generated + tokens.len()).to_vec();
        let entropy: f32 = dist.iter().filter(|e| e.1 > 0.0).map(|e| -e.1 * e.1.ln()).sum();
        let threshold = t.eps.min(t.delta * (-entropy).exp());
        let p = |x: u32| dist.iter().find(|e| e.0 == x).map_or(0.0, |e| e.1);
        match compiled.children[row].iter().find(|&&c| p(compiled.tokens[c]) > threshold) {
            Some(&c) => {
                rows.push(c);
                tokens.push(compiled.tokens[c]);
                hist.push(compiled.tokens[c]);
                row = c;
            }
            None => return Accepted { rows, tokens, bonus: sampler.draw(&dist) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplerConfig;
    use augur_kernels::reference::softmax;

    fn sampler(t: f32) -> Sampler {
        Sampler::new(SamplerConfig { temperature: t, seed: 3, ..Default::default() }).unwrap()
    }


    #[test]
    fn greedy_follows_the_argmax_path() {
        // rows: 0 pending, 1 = token 2 (child of root), 2 = token 0 (child of 1)
        let tree = Tree::chain(&[2, 0]);
        let c = tree.compile(7);
        let logits = [0.0, 0.0, 5.0, /* row1 */ 0.0, 9.0, 1.0, /* row2 */ 3.0, 0.0, 0.0];
        let mut d = Vec::new();
        let a = accept(&tree, &c, &logits, 3, &[], 0, &mut sampler(0.0), &mut Rng::new(1), &mut d);
        assert_eq!(a, Accepted { rows: vec![1], tokens: vec![2], bonus: 1 });
    }

    #[test]
    fn typical_accepts_likely_candidates_and_is_exact_when_greedy() {
        // row 0: p = softmax([2, 1.9, -3]) (two likely tokens); candidates 1 then 0
        let mut tree = Tree::default();
        tree.push(1, None, None);
        let c = tree.compile(7);
        let logits = [2.0, 1.9, -3.0, /* row1 */ 0.0, 0.0, 9.0];
        let t = Typical { eps: 0.09, delta: 0.3 };
        let a = accept_typical(&c, &logits, 3, &[], 0, &mut sampler(1.0), &t);
        assert_eq!((a.rows.clone(), a.tokens.clone(), a.bonus), (vec![1], vec![1], 2), "token 1 has p ≈ 0.47 > threshold");
        let g = accept_typical(&c, &logits, 3, &[], 0, &mut sampler(0.0), &t);
        assert_eq!((g.tokens, g.bonus), (vec![], 0), "greedy: only the argmax passes");
        assert!("0.09,0.3".parse::<Typical>().is_ok());
        assert!("0.09".parse::<Typical>().is_err() && "2,0.3".parse::<Typical>().is_err());
    }

    /// Chi-square test: the first emitted token (accepted or bonus) is distributed as the
    /// target's p, whatever the proposals, for deterministic siblings and for sampled drafts.
    #[test]
    fn rejection_sampling_preserves_the_target_distribution() {
        let target = [1.0f32, 0.5, 0.0, -0.5, -2.0];
        let p = softmax(&target);
        let draft_logits = [-1.0f32, 0.0, 2.0, 0.0, 1.0];
        let q = softmax(&draft_logits);
        let q_pairs: Vec<(u32, f32)> = q.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        let n = 40_000;
        for case in 0..3 {
            let mut rng = Rng::new(17 + case);
            let mut s = sampler(1.0);
            let mut counts = [0usize; 5];
            let mut d = Vec::new();
            for _ in 0..n {
                let mut tree = Tree::default();
                match case {
                    0 => {
                        tree.push(2, None, None);
                        tree.push(4, None, None);
                    }
                    1 => {
                        let x = draw(&q, &mut rng);
                        tree.push(x, None, Some(q_pairs.clone()));
                    }
                    _ => {
                        tree.push(0, None, None);
                    }
                }
                let c = tree.compile(9);
                let rows = c.tokens.len();
                let logits: Vec<f32> = (0..rows).flat_map(|_| target).collect();
                let a = accept(&tree, &c, &logits, 5, &[], 0, &mut s, &mut rng, &mut d);
                let first = a.tokens.first().copied().unwrap_or(a.bonus);
                counts[first as usize] += 1;
            }
            let chi2: f64 = counts.iter().zip(&p).map(|(&o, &pi)| {
                let e = pi as f64 * n as f64;
                (o as f64 - e).powi(2) / e
            }).sum();
            // 4 degrees of freedom: the 99.9th percentile is 18.47.
            assert!(chi2 < 18.47, "case {case}: chi-square {chi2:.2} (counts {counts:?}, p {p:?})");
        }
    }
}
