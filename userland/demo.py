"""``llmos demo``: a scripted tour of llmos on the built-in tiny model (under a minute).

It boots a private kernel (own state directory and socket, so it never touches yours), then
shows what llmos does, step by step — processes, priorities, fork, the file store, the knowledge
graph, a tuner job, alerts, the OpenAI-compatible gateway — and shuts it down. The default model has random weights:
its text is gibberish by design; what matters is what the kernel does with it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmos.syscalls import locate
from llmos.userland import demo_more
from llmos.syscalls.client import connect
from llmos.syscalls.errors import SyscallError


def say(title: str) -> None:
    print(f"\n== {title}")


def show(text: str) -> str:
    """Random weights emit control characters; keep the terminal sane."""
    return "".join(ch if ch.isprintable() else "·" for ch in text)


def table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  " + "  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  " + "  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


def boot(state: Path, model: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmos.kernel", "--state-dir", str(state), "--model", model,
           "--max-num-seqs", "8", "--max-batched-tokens", "128"]
    kproc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and kproc.poll() is None:
        if locate.saved_token(state) and os.path.exists(locate.ipc_path(locate.default_socket(state))):
            try:
                with connect(locate.default_socket(state), locate.saved_token(state), timeout=1) as c:
                    c.nop()
                return kproc
            except SyscallError:
                pass
        time.sleep(0.1)
    raise SystemExit(f"demo: the kernel did not start; see {state / 'kernel.log'}")


def tour(c) -> None:
    u = c.uname()
    m = u["models"][0]
    say("uname: the kernel and its model")
    print(f"  llmos {u['version']} (ABI {u['abi']}) on {u['device']}; model {m['name']} "
          f"({m['architecture']}, {m['params']:,} params{', random weights' if m['random_weights'] else ''})")

    say("spawn: three processes at different priorities (under contention nice -10 goes first)")
    pids = {c.spawn(prompt="The weather today is", max_tokens=48, priority=p, ignore_eos=True): p
            for p in (10, 0, -10)}
    slow = next(pid for pid, p in pids.items() if p == 10)
    c.kill(slow, "STOP")
    print(f"  kill STOP {slow}: a stopped process keeps its place and output, but does not run")
    table(c.ps(), ["pid", "state", "nice", "tokens_in", "tokens_out", "kv_blocks"])

    say("read: streaming the most important one as it generates")
    urgent = next(pid for pid, p in pids.items() if p == -10)
    print("  ", end="")
    for chunk in c.read(urgent):
        print(show(chunk["text"]), end="", flush=True)
    print()
    print(f"  pid {slow} meanwhile: {c.pinfo(slow)['state']}, {c.pinfo(slow)['tokens_out']} tokens; kill CONT")
    c.kill(slow, "CONT")

    say("wait: reaping every process, with usage")
    for pid in pids:
        r = c.wait(pid)
        print(f"  pid {pid}: {r['finish_reason']}, {r['usage']['completion_tokens']} tokens, "
              f"{r['usage']['cached_tokens']} prompt tokens from the prefix cache")

    say("prefix cache: a prompt that shares full KV blocks with an earlier one skips their prefill")
    system = "You are a helpful assistant who answers briefly and kindly. "
    first = c.wait(c.spawn(prompt=system + "What is a kernel?", max_tokens=4))
    again = c.wait(c.spawn(prompt=system + "What is a process?", max_tokens=4))
    print(f"  first: {first['usage']['cached_tokens']} of {first['usage']['prompt_tokens']} prompt tokens cached; "
          f"second: {again['usage']['cached_tokens']} of {again['usage']['prompt_tokens']}")

    say("interactive: one conversation is one process; write continues it with its KV cache")
    chat = c.spawn(messages=[{"role": "user", "content": "Hello!"}], max_tokens=16, interactive=True)
    print("  turn 1:", repr(list(c.read(chat))[-1]["finish_reason"]), "->", c.pinfo(chat)["state"])
    c.write(chat, messages=[{"role": "user", "content": "Tell me more."}])
    print("  turn 2:", repr(list(c.read(chat))[-1]["finish_reason"]),
          f"({c.pinfo(chat)['num_computed_tokens']} tokens of KV kept across turns)")

    say("fork: 4 sampled continuations sharing the conversation's KV blocks copy-on-write")
    kids = c.fork(chat, n=4, seed=7, temperature=0.9)
    mem = c.meminfo()
    print(f"  children {kids}; KV blocks used {mem['blocks_used']}, shared {mem['blocks_shared']}")
    for kid in kids:
        c.write(kid, text=" and then")
        print(f"  pid {kid}: {show(c.wait(kid)['text'][:40])}")
    c.wait(chat)

    say("services: the file store and the knowledge graph (programs outside the kernel)")
    demo_more._services_up(c, {"fs", "kg", "tuner"})
    print("  " + ", ".join(f"{s['name']} (pid {s['pid']}, {len(s['calls'])} calls)" for s in c.svc_list()))
    st = c.call("fs_put", path="notes/hello.txt", data=b"Hello from the llmos file store")
    print(f"  fs_put notes/hello.txt: {st['size']} bytes, sha256 {st['sha256'][:12]}...; "
          f"fs_get: {c.call('fs_get', path='notes/hello.txt').decode()!r}")
    c.call("kg_add", triples=[["Ada", "works_at", "Analytical Engines Ltd"],
                              ["Analytical Engines Ltd", "located_in", "London"]], source="demo")
    print(f"  kg_query (?who, works_at, Analytical Engines Ltd): "
          f"{c.call('kg_query', pattern=['?who', 'works_at', 'Analytical Engines Ltd'])}")
    pid = c.spawn(prompt="Where does Ada work?", max_tokens=8, kg=True)
    print(f"  spawn(kg=True) added these facts before the prompt: {c.pinfo(pid)['kg_facts']}")
    c.wait(pid)

    demo_more.tuner(c, say, show)
    demo_more.alerts(c, say)

    say("meminfo: the paged KV pool")
    mem = c.meminfo()
    print(f"  {mem['blocks_total']} blocks of {mem['block_size']} tokens ({mem['bytes_per_block']} bytes each), "
          f"{mem['blocks_used']} used, {mem['blocks_cached']} cached for prefix reuse, "
          f"{mem['host_blocks_total']} host swap blocks")

    say("errors are replies, not crashes")
    for what, fn in (("kill a pid that does not exist", lambda: c.kill(4242)),
                     ("spawn with max_tokens=0", lambda: c.spawn(prompt="x", max_tokens=0)),
                     ("call something unknown", lambda: c.call("frobnicate"))):
        try:
            fn()
        except SyscallError as err:
            print(f"  {what}: {err.errno} — {err.message}")
    s = c.stat()
    print(f"  the kernel is fine: {s['requests']} requests, {s['errors']} refused, {s['steps']} steps, "
          f"{s['tokens_generated']} tokens generated")


def main(argv: list[str] | None = None) -> int:
    argv = argv or []
    model = argv[argv.index("--model") + 1] if "--model" in argv else "default"
    state = Path(tempfile.mkdtemp(prefix="llmos-demo-"))
    t0 = time.monotonic()
    print(f"llmos demo: booting a private kernel (state {state})")
    kproc = boot(state, model)
    try:
        with connect(locate.default_socket(state), locate.saved_token(state)) as c:
            tour(c)
            demo_more.gateway(c, locate.default_socket(state), locate.saved_token(state), say)
            say("shutdown")
            c.shutdown()
        kproc.wait(30)
        print(f"  kernel exited with {kproc.returncode}; demo took {time.monotonic() - t0:.1f}s")
    finally:
        if kproc.poll() is None:
            kproc.terminate()
            kproc.wait(30)
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
