//! Speculative decoding on tiny models augur writes itself: greedy equals plain greedy for every
//! drafter, the KV cache after a rejection equals the plain path's, and the first sampled token
//! follows the target's distribution (chi-square), while a deliberately wrong rule fails the
//! same test.

use std::ops::ControlFlow;

use augur_decode::sampler::Sampler;
use augur_decode::speculative::{self, DraftModel, Drafter, EarlyExit, PromptLookup, SpecConfig, Tree};
use augur_decode::{generate, GenerateConfig, SamplerConfig};
use augur_models::{tiny, Activations, Logits, Model, State};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("augur-spec-tiny-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn models(dir: &std::path::Path) -> (Model, Model) {
    let (t, d) = (dir.join("target.gguf"), dir.join("draft.gguf"));
    // Untied heads: with a tied embedding a random tiny model mostly predicts its input token.
    tiny::write_gguf(&t, false, Some(augur_core::QuantType::Q4_1), 21).unwrap();
    tiny::write_gguf(&d, false, Some(augur_core::QuantType::Q8_0), 22).unwrap();
    (Model::open(&t).unwrap(), Model::open(&d).unwrap())
}

fn cfg(t: f32, n: usize, act: Activations) -> GenerateConfig {
    GenerateConfig {
        max_tokens: n,
        sampler: SamplerConfig { temperature: t, top_k: 6, seed: 9, ..Default::default() },
        ignore_eos: true,
        activations: act,
        ..Default::default()
    }
}

#[test]
fn greedy_equals_plain_for_every_drafter_and_precision() {
    let dir = tmp("greedy");
    let (target, draft_model) = models(&dir);
    let prompt: Vec<u32> = [40u32, 41, 42, 43, 40, 41, 42, 50, 60, 40, 41].to_vec();
    for act in [Activations::I16, Activations::I22, Activations::F32] {
        let plain = generate(&target, &prompt, &cfg(0.0, 40, act), |_| ControlFlow::Continue(())).unwrap();
        let mut drafters: Vec<(&str, Box<dyn Drafter>)> = vec![
            ("prompt-lookup", Box::new(PromptLookup::new(2, 2))),
            ("early-exit:1", Box::new(EarlyExit { layers: 1 })),
        ];
        let d = Model::open(&draft_model.path).unwrap();
        drafters.push(("draft", Box::new(DraftModel::new(d, &target).unwrap())));
        // The target as its own draft model: every draft is accepted.
        drafters.push(("self-draft", Box::new(DraftModel::new(Model::open(&target.path).unwrap(), &target).unwrap())));
        for (name, mut d) in drafters {
            // The throttle only decides how much is drafted, never what is emitted.
            let (t, _) = speculative::generate(&target, &prompt, &cfg(0.0, 40, act), &SpecConfig::new(4), d.as_mut(), |_| ControlFlow::Continue(())).unwrap();
            assert_eq!(t.generated, plain.generated, "{name} ({act:?}, throttled)");
            let fixed = SpecConfig { throttle: false, ..SpecConfig::new(4) };
            let (s, stats) = speculative::generate(&target, &prompt, &cfg(0.0, 40, act), &fixed, d.as_mut(), |_| ControlFlow::Continue(())).unwrap();
            assert_eq!(s.generated, plain.generated, "{name} ({act:?})");
            if name == "self-draft" {
                assert!(stats.tau() > 3.0, "self-draft accepts everything: tau {}", stats.tau());
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn kv_cache_after_a_rejection_equals_the_plain_path() {
    let dir = tmp("kv");
    let (target, _) = models(&dir);
    let llama = &target.llama;
    let ctx = [40u32, 41, 42, 43];
    // Plain: feed ctx then the greedy continuation one token at a time.
    let mut plain = State::new(&llama.cfg);
    llama.forward(&mut plain, &ctx[..3], Logits::Last).unwrap();
    let l = llama.forward(&mut plain, &ctx[3..], Logits::Last).unwrap();
    let g1 = augur_decode::sampler::argmax(l);
    // Speculative: a tree whose first branch is wrong and second is the true next token g1,
    // followed by a wrong grandchild.
    let mut spec = State::new(&llama.cfg);
    llama.forward(&mut spec, &ctx[..3], Logits::Last).unwrap();
    let mut tree = Tree::default();
    tree.push((g1 + 1) % 200, None, None);
    let b = tree.push(g1, None, None);
    tree.push((g1 + 7) % 200, Some(b), None);
    let c = tree.compile(ctx[3]);
    let base = spec.len();
    let logits = llama.forward_tree(&mut spec, &c.tokens, &c.depth, &c.ancestors).unwrap().to_vec();
    let mut sampler = Sampler::new(SamplerConfig::default()).unwrap();
    let acc = speculative::accept(&tree, &c, &logits, llama.cfg.vocab, &ctx, 0, &mut sampler, &mut augur_decode::rng::Rng::new(1), &mut Vec::new());
    assert_eq!(acc.tokens, vec![g1], "the true branch is accepted, its wrong child rejected");
    let mut keep = vec![0];
    keep.extend_from_slice(&acc.rows);
    spec.keep(base, &keep);
    llama.forward(&mut plain, &[g1], Logits::Last).unwrap();
    assert_eq!(spec.len(), plain.len());
    for layer in 0..llama.cfg.n_layer {
        assert!(spec.kv(layer) == plain.kv(layer), "layer {layer}: KV cache differs from the plain path");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Chi-square statistic of `counts` against probabilities `p` (categories with p > 0).
fn chi2(counts: &[usize], p: &[(u32, f32)], n: usize) -> f64 {
    p.iter().map(|&(id, pi)| {
        let e = pi as f64 * n as f64;
        (counts[id as usize] as f64 - e).powi(2) / e
    }).sum()
}

#[test]
fn sampled_first_token_follows_the_target_distribution() {
    let dir = tmp("chi2");
    let (target, draft_model) = models(&dir);
    let prompt = [40u32, 41, 42];
    let c = cfg(2.0, 1, Activations::I22);
    // The target's filtered next-token distribution.
    let mut st = State::new(&target.llama.cfg);
    let l = target.llama.forward(&mut st, &prompt, Logits::Last).unwrap().to_vec();
    let p = Sampler::new(c.sampler.clone()).unwrap().distribution(&l, &prompt).to_vec();
    assert!(p.iter().filter(|e| e.1 > 0.05).count() >= 3, "the test needs a spread-out target distribution: {p:?}");
    let n = 3000;
    let mut counts = vec![0usize; target.llama.cfg.vocab];
    let mut drafter = DraftModel::new(Model::open(&draft_model.path).unwrap(), &target).unwrap();
    for seed in 0..n {
        let mut cs = c.clone();
        cs.sampler.seed = seed as u64;
        let (s, _) = speculative::generate(&target, &prompt, &cs, &SpecConfig::new(3), &mut drafter, |_| ControlFlow::Continue(())).unwrap();
        counts[s.generated[0] as usize] += 1;
    }
    let x = chi2(&counts, &p, n);
    // 5 degrees of freedom (top-k 6): the 99.9th percentile is 20.5.
    assert!(x < 20.5, "chi-square {x:.1}: speculative sampling does not match the target");

    // A wrong rule, always keeping the draft's token, produces the draft's distribution and fails.
    let mut dst = State::new(&draft_model.llama.cfg);
    let ld = draft_model.llama.forward(&mut dst, &prompt, Logits::Last).unwrap().to_vec();
    let mut s = Sampler::new(c.sampler.clone()).unwrap();
    let mut wrong = vec![0usize; target.llama.cfg.vocab];
    for _ in 0..n {
        let q = s.distribution(&ld, &prompt).to_vec();
        wrong[s.draw(&q) as usize] += 1;
    }
    let x = chi2(&wrong, &p, n);
    assert!(x > 20.5, "the wrong rule should fail the same test (chi-square {x:.1})");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_session_reuses_the_conversation_prefix_and_matches_a_fresh_run() {
    use augur_decode::{generate_in, Session};
    let dir = tmp("session");
    let (target, _) = models(&dir);
    let mut session = Session::new(&target);
    let turn1: Vec<u32> = vec![40, 41, 42];
    let c = cfg(0.0, 5, Activations::I22);
    let a = generate_in(&mut session, &target, &turn1, &c, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(a.cached_tokens, 0);
    let mut turn2 = turn1.clone();
    turn2.extend_from_slice(&a.generated);
    turn2.extend_from_slice(&[50, 51]);
    let b = generate_in(&mut session, &target, &turn2, &c, |_| ControlFlow::Continue(())).unwrap();
    // Everything but the last generated token of turn 1 was in the cache.
    assert_eq!(b.cached_tokens, turn1.len() + a.generated.len() - 1);
    let fresh = generate(&target, &turn2, &c, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(b.generated, fresh.generated, "short prompts take the same kernels either way");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sequences_stepped_together_match_plain_generation() {
    use augur_decode::sequence::Sequence;
    let dir = tmp("batch");
    let (target, _) = models(&dir);
    let prompts: [&[u32]; 3] = [&[40, 41, 42], &[7, 8], &[100, 101, 102, 103]];
    let configs: Vec<GenerateConfig> = (0..3).map(|i| {
        let mut c = cfg(if i == 1 { 0.9 } else { 0.0 }, 6 + 3 * i, Activations::I22);
        c.sampler.seed = 11 + i as u64;
        c
    }).collect();
    let mut seqs: Vec<Sequence> = prompts.iter().zip(&configs).map(|(p, c)| Sequence::start(&target, p, c, |_| ControlFlow::Continue(())).unwrap()).collect();
    let mut scratch = augur_models::State::new(&target.llama.cfg);
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].next_input().is_some()).collect();
        if live.is_empty() {
            break;
        }
        let toks: Vec<u32> = live.iter().map(|&i| seqs[i].next_input().unwrap()).collect();
        let logits = {
            let mut refs: Vec<&mut augur_models::State> = seqs.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, s)| &mut s.state).collect();
            target.llama.forward_many(&mut scratch, &mut refs, &toks).unwrap().to_vec()
        };
        let v = target.llama.cfg.vocab;
        for (row, &i) in live.iter().enumerate() {
            seqs[i].advance(&target, &logits[row * v..(row + 1) * v], &mut |_| ControlFlow::Continue(())).unwrap();
        }
    }
    for ((seq, p), c) in seqs.into_iter().zip(prompts).zip(&configs) {
        let plain = generate(&target, p, c, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(seq.finish().generated, plain.generated);
    }
    std::fs::remove_dir_all(&dir).ok();
}
