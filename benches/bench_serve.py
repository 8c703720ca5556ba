"""Throughput and latency of `erm serve` on loopback: requests/s and p50/p99 latency at 1, 8 and
32 concurrent clients, each request one (prompt, response) pair on POST /score.

The server runs in its own process (`python -m erm.serve --port 0`), the clients in this one
(asyncio + httpx, one connection per client); each level sends a bounded number of requests after
a short warm-up, then the server is stopped with SIGTERM.

    python benches/bench_serve.py OUT_DIR --tiny                # a tiny random Llama (seconds)
    python benches/bench_serve.py OUT_DIR                       # the embedded SmolLM2-135M
    python benches/bench_serve.py OUT_DIR --model PATH --concurrency 1,8,32 --requests 64

Writes OUT_DIR/bench_serve_<label>.json and prints a markdown table.
"""
import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)                    # benches/common.py

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2+2?", "2+2 equals 4."),
    ("Name a primary colour.", "Blue is a primary colour."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("Is the Earth flat?", "No, the Earth is roughly a sphere."),
    ("Translate 'hello' into French.", "'Hello' in French is 'bonjour'."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]


def _percentile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(model, args):
    cmd = [sys.executable, "-m", "erm.serve", "--port", "0",
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    if model:
        cmd += ["--model", model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    url, t0 = None, time.monotonic()
    while url is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("the server exited before listening")
        if "listening on" in line:
            url = line.split("listening on ")[1].split()[0]
    threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()
    import httpx
    while True:  # the model loads in the server's worker: wait for /health
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > args.load_timeout:
            proc.kill()
            raise RuntimeError("the server did not become ready")
        time.sleep(0.2)
    return proc, url, time.monotonic() - t0


async def run_level(url, concurrency, n_requests):
    import httpx
    lat = []
    counter = iter(range(n_requests))

    async def client_loop(client):
        for i in counter:
            p, r = PAIRS[i % len(PAIRS)]
            t = time.perf_counter()
            resp = await client.post("/score", json={"prompts": [p], "responses": [r]})
            lat.append(time.perf_counter() - t)
            resp.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for i in range(min(4, concurrency * 2)):   # warm-up
            await client.post("/score", json={"prompts": [PAIRS[0][0]], "responses": [PAIRS[0][1]]})
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n_requests, "wall_s": wall,
            "req_per_s": n_requests / wall, "p50_ms": 1000 * _percentile(lat, 0.5),
            "p99_ms": 1000 * _percentile(lat, 0.99)}


def tiny_model_dir(path):
    """Save a tiny random Llama (hidden 32, 2 layers) and its small tokenizer in `path`."""
    from common import random_causal_lm, small_tokenizer

    tok = small_tokenizer()
    model = random_causal_lm("llama", vocab=len(tok), tie=False, max_positions=512)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the JSON results")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--model", help="model path (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tiny", action="store_true", help="a tiny random Llama (for a smoke run)")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (default 64)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, help="the server's torch threads (erm serve --threads)")
    ap.add_argument("--load-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model_dir(os.path.join(tmp, "tiny")) if args.tiny else args.model
        label = "tiny" if args.tiny else (os.path.basename(os.path.normpath(model)) if model
                                          else "smollm2-135m")
        proc, url, ready_s = start_server(model, args)
        try:
            rows = [asyncio.run(run_level(url, c, args.requests)) for c in levels]
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
    result = {"model": label, "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
              "threads": args.threads, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
              "server_ready_s": ready_s, "server_exit": rc, "levels": rows}
    path = os.path.join(args.out, f"bench_serve_{label}_t{args.threads or 'default'}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"erm serve, model {label}, {result['device']}, threads {args.threads or 'default'}, "
          f"max batch {args.max_batch_size}, "
          f"wait {args.max_wait_ms} ms, {args.requests} one-pair requests per level")
    print("| clients | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} |")
    print(f"(server ready after {ready_s:.1f}s; exit status after SIGTERM {rc}; wrote {path})")
    return result


if __name__ == "__main__":
    main()
