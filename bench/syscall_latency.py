"""Null-call round trip: llmos `nop` vs a raw pyzmq+msgpack DEALER/ROUTER echo, same run; and
llmos over ipc, plain loopback TCP and CURVE-encrypted TCP (``--listen``).

    python bench/syscall_latency.py [--calls 5000] [--clients 8]

Prints p50/p99 latency and calls/s with 1 and with N concurrent clients (separate processes)
for each, and the ratios. The echo server decodes each msgpack request and encodes a reply,
so the difference is what llmos adds: the I/O thread hop, authentication, the table lookup,
argument checking and dispatch. CURVE vs plain TCP is what encryption and the CURVE
forwarder add (target: p50 at most 1.5x plain TCP).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def echo_server(endpoint: str, ready) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    ready.set()
    while True:
        ident, frame = s.recv_multipart()
        req = msgpack.unpackb(frame)
        if req.get("call") == "quit":
            break
        s.send_multipart([ident, msgpack.packb({"v": 1, "id": req["id"], "ok": True, "result": None,
                                                "more": False})])


def client_run(endpoint: str, token: str | None, calls: int, start_at: float, out, server_key=None) -> None:
    from llmos.syscalls import abi, remote
    s = zmq.Context().socket(zmq.DEALER)
    if server_key:
        remote.Curve(server_key).apply(s)
    s.connect(endpoint)
    time.sleep(max(0.0, start_at - time.time()))
    lat = []
    t_begin = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        s.send(abi.encode_request(i, "nop", {}, token))
        abi.decode_reply(s.recv())
        lat.append(time.perf_counter() - t0)
    out.put((lat, time.perf_counter() - t_begin))


def measure(endpoint: str, token: str | None, calls: int, clients: int, server_key: str | None = None) -> dict:
    q = mp.Queue()
    start_at = time.time() + 0.5
    procs = [mp.Process(target=client_run, args=(endpoint, token, calls, start_at, q, server_key))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r, _ in results for x in r[calls // 10:])      # drop warm-up
    wall = max(w for _, w in results)
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
            "calls_per_s": clients * calls / wall}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; medians are reported")
    a = ap.parse_args()
    from conftest import KernelProc

    from llmos.kernel.curve import public_key
    tmp = tempfile.mkdtemp(prefix="llmos-echo-")
    os.environ["LLMOS_CONFIG_DIR"] = tmp                  # the CURVE clients' key pair
    tcp, curve = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    kernel = KernelProc("--listen", curve, model="none").start()
    plain = KernelProc("--socket", tcp, model="none").start()
    key = public_key(kernel.state)
    echo_ep = f"ipc://{tmp}/echo.sock"
    ready = mp.Event()
    echo = mp.Process(target=echo_server, args=(echo_ep, ready), daemon=True)
    echo.start()
    ready.wait(10)
    rows = []
    try:
        for n in (1, a.clients):
            for name, ep, tok, sk in (("raw echo", echo_ep, None, None), ("llmos nop", kernel.socket, kernel.token, None),
                                      ("llmos tcp", tcp, plain.token, None), ("llmos curve", curve, kernel.token, key)):
                runs = [measure(ep, tok, a.calls, n, sk) for _ in range(a.repeat)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append((n, name, med))
    finally:
        s = zmq.Context().socket(zmq.DEALER)
        s.connect(echo_ep)
        s.send(msgpack.packb({"id": 0, "call": "quit"}))
        echo.join(5)
        kernel.cleanup()
        plain.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"syscall round trip, {a.calls} calls per client, median of {a.repeat} runs, {os.cpu_count()} cores")
    print(f"{'clients':>7}  {'server':<12} {'p50 us':>8} {'p99 us':>8} {'calls/s':>9}   (llmos nop: ipc)")
    for n, name, m in rows:
        print(f"{n:>7}  {name:<12} {m['p50_us']:8.1f} {m['p99_us']:8.1f} {m['calls_per_s']:9.0f}")
    for n in (1, a.clients):
        got = {nm: m for k, nm, m in rows if k == n}
        raw, ll, tcp_m, cur = got["raw echo"], got["llmos nop"], got["llmos tcp"], got["llmos curve"]
        print(f"{n} client(s): llmos p50 = {ll['p50_us'] / raw['p50_us']:.2f}x raw echo; "
              f"throughput = {ll['calls_per_s'] / raw['calls_per_s']:.2f}x raw echo; "
              f"CURVE p50 = {cur['p50_us'] / tcp_m['p50_us']:.2f}x plain TCP (target <= 1.5x), "
              f"throughput = {cur['calls_per_s'] / tcp_m['calls_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
