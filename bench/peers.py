#!/usr/bin/env python3
"""augur vs llama.cpp, side by side on one machine, alternating runs; prints a markdown table.

Usage: bench/peers.sh [--rounds 5] [--threads 2]

Each round runs every test once for augur and once for llama.cpp (alternating), each run started
only when the machine is idle and discarded (then retried) if other processes used CPU during it
(read from /proc/stat). Medians over rounds. llama.cpp runs with --repack 0: its AMX repack path
crashes on the project's Intel machines.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def wait_idle(max_wait=120):
    t0 = time.time()
    while time.time() - t0 < max_wait:
        b0, t0_ = cpu_jiffies()
        time.sleep(0.5)
        b1, t1 = cpu_jiffies()
        if (b1 - b0) / max(1, t1 - t0_) < 0.05:
            return True
    return False


def timed(cmd):
    """Run cmd; return (stdout, foreign CPU fraction during the run, child peak RSS MiB)."""
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count()
    wait_idle()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, _ = cpu_jiffies()
    w0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - w0
    b1, _ = cpu_jiffies()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    child = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    foreign = max(0.0, (b1 - b0) / hz - child) / (wall * ncpu)
    return out.stdout, foreign, ru1.ru_maxrss / 1024


def clean(cmd, tries=4):
    for _ in range(tries):
        out, foreign, rss = timed(cmd)
        if foreign < 0.05:
            return out, rss
        print(f"  (discarded a run: {foreign:.0%} foreign CPU)", file=sys.stderr)
    return out, rss


def augur(binary, model, threads, extra):
    out, rss = clean([binary, "bench", "-m", model, "-t", str(threads), "--runs", "1"] + extra)
    return json.loads(out), rss


def llama(binary, model, threads, extra):
    out, rss = clean([binary, "-m", model, "-t", str(threads), "--repack", "0", "-r", "1", "-o", "json"] + extra)
    return json.loads(out), rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--augur", default=os.path.join(ROOT, "target/release/augur"))
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    batches = [1, 2, 4, 8, 16]
    res = {k: [] for k in ["pp128", "pp512", "tg128", "tg128@512"] + [f"b{b}@192" for b in batches]}
    peer = {k: [] for k in res}
    rss = {"augur": [], "llama.cpp": []}
    bw = []
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        j, _ = augur(a.augur, a.model, a.threads, ["-p", "128", "-g", "0"])
        res["pp128"].append(j["prefill_tok_per_s"])
        j, _ = augur(a.augur, a.model, a.threads, ["-p", "512", "-g", "128", "--bandwidth"])
        res["pp512"].append(j["prefill_tok_per_s"])
        res["tg128@512"].append(j["decode_tok_per_s"])
        bw.append(j["read_bandwidth_gb_s"])
        j, m = augur(a.augur, a.model, a.threads, ["-p", "1", "-g", "128"])
        res["tg128"].append(j["decode_tok_per_s"])
        rss["augur"].append(j["peak_rss_mib"])
        j, _ = augur(a.augur, a.model, a.threads, ["-p", "1", "-g", "0", "-d", "192", "--batches", ",".join(map(str, batches))])
        for b in batches:
            res[f"b{b}@192"].append(j["batch_tok_per_s"][str(b)])
        for rows, _ in [llama(a.llama_bench, a.model, a.threads, ["-p", "128,512", "-n", "0"])]:
            for row in rows:
                peer[f"pp{row['n_prompt']}"].append(row["avg_ts"])
        rows, m = llama(a.llama_bench, a.model, a.threads, ["-p", "0", "-n", "128"])
        peer["tg128"].append(rows[0]["avg_ts"])
        rss["llama.cpp"].append(m)
        rows, _ = llama(a.llama_bench, a.model, a.threads, ["-p", "0", "-n", "128", "-d", "512"])
        peer["tg128@512"].append(rows[0]["avg_ts"])
        rows, _ = llama(a.llama_bench, a.model, a.threads, ["-p", ",".join(map(str, batches)), "-n", "0", "-d", "192"])
        for row in rows:
            peer[f"b{row['n_prompt']}@192"].append(row["avg_ts"])
    med = statistics.median
    model_bytes = os.path.getsize(a.model)
    print(f"\n{a.rounds} alternating rounds, {a.threads} threads, {time.strftime('%Y-%m-%d')}, "
          f"CPU: {cpu_name()}, model {os.path.basename(a.model)} ({model_bytes / 2**20:.1f} MiB)\n")
    print("| test | augur tok/s | llama.cpp tok/s | augur / llama.cpp |")
    print("|---|---|---|---|")
    for k in res:
        x, y = med(res[k]), med(peer[k])
        print(f"| {k} | {x:.1f} | {y:.1f} | {x / y:.2f} |")
    ra, rl = med(rss["augur"]), med(rss["llama.cpp"])
    print(f"| peak RSS (MiB, tg128) | {ra:.0f} | {rl:.0f} | {ra / rl:.2f} |")
    b = med(bw)
    bound = b * 1e9 / model_bytes
    print(f"\nRead bandwidth over {model_bytes / 2**20:.0f} MiB: {b:.1f} GB/s -> decode bound {bound:.0f} tok/s; "
          f"augur tg128 = {med(res['tg128']) / bound:.0%} of it, llama.cpp {med(peer['tg128']) / bound:.0%}.")
    t1 = {k: med(res[k]) for k in res}
    p1 = {k: med(peer[k]) for k in peer}
    print("Cost of verifying b tokens relative to one decode step at depth 192 (b / (tok/s_b / tok/s_1)):")
    for bb in batches:
        print(f"  b={bb}: augur {bb * t1['b1@192'] / t1[f'b{bb}@192']:.2f}x, llama.cpp {bb * p1['b1@192'] / p1[f'b{bb}@192']:.2f}x")


def cpu_name():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
