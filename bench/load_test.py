#!/usr/bin/env python3
"""Load test for OpenAI-compatible servers on loopback: N concurrent streaming clients.

For each engine (augur, and llama.cpp's server from `llama-cpp-python[server]` when installed) it
starts the server on 127.0.0.1, runs every request alone (greedy), then all of them at once, and
reports: each concurrent stream complete and identical to its solo text, aggregate tokens/s vs one
client, p50/p99 time to first token, and the server's peak RSS. Bounded: --clients requests of
--max-tokens tokens, each with a timeout.

Usage: bench/load_test.py --model M.gguf [--clients 16] [--max-tokens 64] [--engines augur,llama.cpp]
"""
import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["the sea", "a city at night", "autumn leaves", "a robot", "a library", "the moon", "a garden", "winter",
          "a train journey", "coffee", "mountains", "a lighthouse", "rain", "a market", "the desert", "a violin"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine, model, port, threads):
    if engine == "augur":
        cmd = [os.path.join(ROOT, "target/release/augur"), "serve", "-m", model, "--port", str(port), "-t", str(threads),
               "--max-queue", "64"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", "4096"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    sys.exit(f"{engine} server did not start")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def stream(client, prompt, max_tokens):
    t0 = time.perf_counter()
    ttft, text, done, pieces = None, "", False, 0
    s = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in s:
        for c in chunk.choices:
            if c.text:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += c.text
                pieces += 1
            done = done or c.finish_reason is not None
    return {"ttft": ttft or float("nan"), "text": text, "done": done, "pieces": pieces, "secs": time.perf_counter() - t0}


async def run(engine, model, n, max_tokens, threads):
    port = free_port()
    proc = start(engine, model, port, threads)
    url = f"http://127.0.0.1:{port}"
    prompts = [f"Write a short poem about {TOPICS[i % len(TOPICS)]}.\n" for i in range(n)]
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        # token counts and solo texts (non-streamed, greedy)
        solo, tokens = [], []
        for p in prompts:
            r = await client.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0)
            solo.append(r.choices[0].text)
            tokens.append(r.usage.completion_tokens)
        one = await stream(client, prompts[0], max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[stream(client, p, max_tokens) for p in prompts])
        wall = time.perf_counter() - t0
    finally:
        rss = peak_rss_mib(proc.pid)
        proc.terminate()
        proc.wait(timeout=30)
    same = sum(r["done"] and r["text"] == s for r, s in zip(results, solo))
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "engine": engine,
        "streams_complete_and_identical": f"{same}/{n}",
        # streamed text chunks (about one per token) actually received during the concurrent phase
        "aggregate_tok_s": sum(r["pieces"] for r in results) / wall,
        "single_client_tok_s": tokens[0] / one["secs"],
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "peak_rss_mib": rss,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="augur,llama.cpp")
    a = ap.parse_args()
    rows = []
    for engine in a.engines.split(","):
        if engine == "llama.cpp":
            try:
                import llama_cpp.server  # noqa: F401
            except ImportError:
                print("llama.cpp: skipped (pip install 'llama-cpp-python[server]')", file=sys.stderr)
                continue
        rows.append(asyncio.run(run(engine, a.model, a.clients, a.max_tokens, a.threads)))
    print(f"\n{a.clients} concurrent streaming clients, {a.max_tokens} tokens each, greedy, {a.threads} threads, {time.strftime('%Y-%m-%d')}\n")
    print("| engine | streams complete & = solo | aggregate tok/s | 1 client tok/s | TTFT p50 s | TTFT p99 s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['streams_complete_and_identical']} | {r['aggregate_tok_s']:.1f} | {r['single_client_tok_s']:.1f} | "
              f"{r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
