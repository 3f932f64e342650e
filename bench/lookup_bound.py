"""How far can n-gram drafting go on a task set? Replays greedy outputs offline.

Input: the token streams `augur spec-bench --dump FILE` writes (one JSON line per task: group,
prompt ids, plain greedy output ids). Greedy speculation is lossless, so a drafting policy's
acceptance on these streams is exactly what the engine would see: each round drafts after the
accepted tokens, keeps the longest prefix equal to the true continuation, and emits one more.

For each group it prints tau (tokens per target pass) and an estimated speedup over plain
decoding, whose cost per pass is the measured cost of a forward pass over b = 1 + draft tokens
(`--cost`, the `verify_cost` line spec-bench prints; missing sizes are interpolated). Drafting
time is not counted, so the speedups are upper estimates. Policies:
- `lookup`: augur's prompt lookup (longest suffix of 2..8 tokens, most recent occurrence, a draft
  no longer than the match, at most k tokens);
- `lookup, long drafts`: the same with drafts of k tokens whatever the match;
- `oracle`: for every round, the best any copy could do: among all earlier positions whose
  preceding tokens equal the context's last `min` tokens, the one that copies the most of the true
  continuation, drafted at exactly that length. No n-gram drafter with that shortest match can
  beat it.

Usage: python3 bench/lookup_bound.py TOKENS.jsonl [--cost '{"1":1,"2":1.19,...}'] [--k 8]
"""
import argparse
import json


def cost_curve(given):
    pts = sorted((int(b), float(c)) for b, c in given.items())

    def cost(b):
        for (b0, c0), (b1, c1) in zip(pts, pts[1:]):
            if b0 <= b <= b1:
                return c0 + (c1 - c0) * (b - b0) / (b1 - b0)
        (b0, c0), (b1, c1) = pts[-2], pts[-1]
        return c1 + (c1 - c0) * (b - b1) / (b1 - b0)

    return cost


def lookup(ctx, k, long_drafts):
    for n in range(min(8, len(ctx) - 1), 1, -1):
        suffix = ctx[-n:]
        for s in range(len(ctx) - n - 1, -1, -1):
            if ctx[s:s + n] == suffix:
                return ctx[s + n:s + n + (k if long_drafts else min(k, n))]
    return []


def oracle(ctx, out, i, k, shortest):
    """Longest copy of out[i + 1:] available after a match of `shortest` tokens."""
    suffix, best = ctx[-shortest:], 0
    for s in range(shortest, len(ctx)):
        if ctx[s - shortest:s] != suffix:
            continue
        a = 0
        while a < k and i + 1 + a < len(out) and s + a < len(ctx) and ctx[s + a] == out[i + 1 + a]:
            a += 1
        best = max(best, a)
    return out[i + 1:i + 1 + best]


def replay(rec, draft, cost):
    prompt, out = rec["prompt"], rec["out"]
    full = prompt + out
    i, passes, spent = 0, 1, cost(1)  # the prefill pass chose out[0]
    while i < len(out) - 1:
        d = draft(full[:len(prompt) + i + 1], out, i)
        a = 0
        while a < len(d) and i + 1 + a < len(out) and d[a] == out[i + 1 + a]:
            a += 1
        passes += 1
        spent += cost(1 + len(d))
        i += a + 1
    return len(out), passes, spent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("tokens")
    p.add_argument("--cost", default='{"1":1,"2":1.19,"4":1.57,"8":2.58,"16":5.11}')
    p.add_argument("--k", type=int, default=8)
    a = p.parse_args()
    cost = cost_curve(json.loads(a.cost))
    recs = [json.loads(line) for line in open(a.tokens)]
    policies = {
        "lookup": lambda ctx, out, i: lookup(ctx, a.k, False),
        "lookup, long drafts": lambda ctx, out, i: lookup(ctx, a.k, True),
        "oracle, match >= 2": lambda ctx, out, i: oracle(ctx, out, i, 16, 2),
        "oracle, match >= 1": lambda ctx, out, i: oracle(ctx, out, i, 16, 1),
    }
    print("| group | policy | tau | est. speedup |")
    print("|---|---|---|---|")
    for group in sorted({r["group"] for r in recs}):
        for name, draft in policies.items():
            tokens = passes = spent = 0
            for r in recs:
                if r["group"] == group:
                    t, n, c = replay(r, draft, cost)
                    tokens, passes, spent = tokens + t, passes + n, spent + c
            # Plain decoding pays cost(1) per token.
            print(f"| {group} | {name} | {tokens / passes:.2f} | {tokens * cost(1) / spent:.2f}x |")


if __name__ == "__main__":
    main()
