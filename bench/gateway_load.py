"""HTTP gateway under load: streamed completions through the gateway vs the same work over the ABI.

    python bench/gateway_load.py [--requests 400] [--concurrency 32] [--max-tokens 16]
                                 [--url http://127.0.0.1:8000 --token T]   (an already running gateway)

Without ``--url`` it boots a kernel on the built-in tiny model and starts the gateway as its own
process (``llmos serve-http``), as it would run in production. Every request streams ``--max-tokens`` tokens of a distinct prompt
(the prefix cache cannot help); the script checks each one succeeded, then prints requests/s,
output tokens/s and client-side time-to-first-token and total latency (p50/p99). The ABI side
runs the same requests as spawn+read+wait from ``--concurrency`` threads, one client each, so the
difference is what HTTP, JSON/SSE and the gateway's thread hand-off cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MODEL = "llmos-tiny-random"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def report(name: str, wall: float, ttfts: list[float], totals: list[float], tokens: int) -> None:
    n = len(totals)
    print(f"{name:8s} {n / wall:8.1f} req/s {tokens / wall:9.1f} tok/s   "
          f"ttft p50 {1e3 * statistics.median(ttfts):7.1f} ms p99 {1e3 * pct(ttfts, 0.99):7.1f} ms   "
          f"latency p50 {1e3 * statistics.median(totals):7.1f} ms p99 {1e3 * pct(totals, 0.99):7.1f} ms")


async def http_side(url: str, token: str, n: int, concurrency: int, max_tokens: int, tag: str):
    import httpx
    gate = asyncio.Semaphore(concurrency)
    ttfts, totals, tokens = [], [], 0

    async def one(client, i):
        nonlocal tokens
        body = {"model": MODEL, "prompt": f"{tag} request {i} " * 3, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        async with gate:
            t0 = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            totals.append(time.perf_counter() - t0)
            ttfts.append((first or time.perf_counter()) - t0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 limits=limits, timeout=300) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
    assert len(totals) == n
    if tag != "warm-up":
        report("gateway", wall, ttfts, totals, tokens)


def abi_side(kernel, n: int, concurrency: int, max_tokens: int, tag: str) -> None:
    local = threading.local()
    ttfts, totals, tokens = [], [], []

    def one(i):
        c = getattr(local, "c", None) or kernel.client()
        local.c = c
        t0 = time.perf_counter()
        pid = c.spawn(prompt=f"{tag} request {i} " * 3, max_tokens=max_tokens, temperature=0.0)
        first = None
        for frame in c.read(pid):
            if first is None and frame.get("text"):
                first = time.perf_counter()
        tokens.append(c.wait(pid)["usage"]["completion_tokens"])
        totals.append(time.perf_counter() - t0)
        ttfts.append((first or time.perf_counter()) - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    report("abi", time.perf_counter() - t0, ttfts, totals, sum(tokens))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--url", help="a running gateway (skips the kernel boot and the ABI side)")
    ap.add_argument("--token", help="bearer token for --url")
    args = ap.parse_args()
    if args.url:
        asyncio.run(http_side(args.url, args.token, args.requests, args.concurrency, args.max_tokens, "run"))
        return 0

    import httpx
    from conftest import KernelProc
    kernel = KernelProc("--device", "cpu", "--dtype", "float32", model="default").start()
    gateway = None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve = "import sys; from llmos.userland.gateway import main; sys.exit(main(sys.argv[1:]))"
        gateway = subprocess.Popen([sys.executable, "-c", serve, "--port", str(port), "--socket", kernel.socket,
                                    "--metrics-token", kernel.token],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/health").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print(f"{args.requests} streamed requests, {args.concurrency} at a time, {args.max_tokens} tokens each")
        asyncio.run(http_side(url, kernel.token, 32, 8, 4, "warm-up"))
        abi_side(kernel, args.requests, args.concurrency, args.max_tokens, "abi")
        asyncio.run(http_side(url, kernel.token, args.requests, args.concurrency, args.max_tokens, "http"))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        kernel.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
