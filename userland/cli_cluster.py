"""``llmos cluster up|status|down|drain|add``: many kernels on Ray behind one front.

    llmos cluster up [--address HOST:PORT | auto] [--kernels N | --per-gpu] [--kernel-cpus C]
                     [--listen tcp://HOST:PORT] [--placement prefix|round-robin|least-loaded]
                     [kernel options: --model, --alias, --dtype, ...]
    llmos cluster status [--json]      nodes, kernels, models, load
    llmos cluster drain KERNEL|NODE    move its processes to the others, then stop it
    llmos cluster add [N]              start N more kernels
    llmos cluster down [--drain | --discard]

Without ``--address``, ``up`` starts a Ray cluster of its own on this machine (``ray start
--head``), which ``down`` stops again; with one (``auto`` for the one ``ray start`` made here)
it joins it. ``up --address`` of a cluster whose kernels run (a front that died) starts a new
front that adopts them and their processes' pids. The front serves the state directory's usual socket, so every other command, the
shell, ``llmos run`` programs and the gateway talk to the cluster unchanged.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmos.syscalls import locate
from llmos.syscalls.client import connect
from llmos.syscalls.errors import SyscallError

INFO = "cluster.json"
_OWN = {"--address": 1, "--kernels": 1, "--per-gpu": 0, "--kernel-cpus": 1, "--listen": 1, "--placement": 1,
        "--balance-abs": 1, "--balance-rel": 1, "--max-procs-per-user": 1, "--state-dir": 1}


def main(argv: list[str]) -> int:
    sub, rest = (argv[0], argv[1:]) if argv else ("status", [])
    fn = {"up": up, "status": status, "down": down, "drain": drain, "add": add}.get(sub)
    if fn is None or "-h" in rest or "--help" in rest:
        print(__doc__, file=sys.stderr if fn is None else sys.stdout)
        return 2 if fn is None else 0
    try:
        return fn(rest)
    except SyscallError as err:
        print(f"llmos: {err.errno}: {err.message}", file=sys.stderr)
        return 1


def _split(argv: list[str]) -> tuple[dict, list[str]]:
    """The front's own options, and the kernel options it passes to every kernel."""
    own, kernel, i = {}, [], 0
    while i < len(argv):
        name, _, inline = argv[i].partition("=")
        if name in _OWN:
            if _OWN[name] and not inline:
                if i + 1 >= len(argv):
                    raise SystemExit(f"llmos: {name} needs a value")
                inline, i = argv[i + 1], i + 1
            own[name] = inline if _OWN[name] else True
        else:
            kernel.append(argv[i])
        i += 1
    return own, kernel


def up(argv: list[str]) -> int:
    own, kernel_args = _split(argv)
    state = Path(own["--state-dir"]).expanduser() if "--state-dir" in own else locate.state_dir()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    from llmos.cluster import launch
    info = {"state_dir": str(state)}
    address = own.get("--address")
    try:
        before = json.loads((state / INFO).read_text())
    except (OSError, ValueError):
        before = {}
    if address is not None and before.get("address") == address and before.get("ray_head_pid"):
        info["ray_head_pid"] = before["ray_head_pid"]    # a new front for the cluster an earlier up made
    if address is None:
        n = int(own.get("--kernels", 1))
        cpus = float(own.get("--kernel-cpus", 1))
        address, info["ray_head_pid"] = launch.start_head(state, num_cpus=max(os.cpu_count() or 1, int(n * cpus + 0.999)))
    info["address"] = address
    # under the supervisor: a front that crashes comes back, adopting the kernels and their pids
    cmd = [sys.executable, "-m", "llmos.kernel.supervise", "--module", "llmos.cluster", "--state-dir", str(state),
           "--address", address]
    for name, value in own.items():
        if name not in ("--address", "--state-dir"):
            cmd += [name] if value is True else [name, value]
    out = state / "front.out"
    start = out.stat().st_size if out.exists() else 0
    with open(out, "ab") as log:
        proc = subprocess.Popen(cmd + ["--", *kernel_args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    info["front_pid"] = proc.pid                        # the supervisor's: the front is its child
    (state / INFO).write_text(json.dumps(info, indent=1))
    from llmos.cluster.serve import READY
    while True:
        text = out.read_bytes()[start:].decode(errors="replace")
        if READY in text:
            print(text[text.index(READY):].splitlines()[0])
            print(f"llmos: Ray at {address}; llmos cluster status shows the kernels, llmos cluster down stops it")
            return 0
        if proc.poll() is not None:
            print(f"llmos: the cluster front exited ({proc.returncode}):\n{text[-3000:]}", file=sys.stderr)
            _stop_head(info)
            return 1
        time.sleep(0.1)


def _client():
    return connect(timeout=600)


def status(argv: list[str]) -> int:
    with _client() as c:
        st = c.cluster()
    if "--json" in argv:
        print(json.dumps(st, indent=1, default=str))
        return 0
    alive = sum(1 for n in st["nodes"] if n["alive"])
    print(f"nodes: {alive} alive of {len(st['nodes'])}; processes: {st['processes']}; "
          f"placement: {st['placement'].get('policy')}")
    print(f"{'KERNEL':>6} {'STATE':9} {'HOST':16} {'LOAD':>5} {'TOKENS':>8} {'RESTARTS':>8}  MODELS")
    for k in st["kernels"]:
        models = ", ".join(f"{n}({w})" for n, w in sorted(k["models"].items()))
        print(f"{k['kernel']:>6} {k['state']:9} {k['host']:16} {k['load']:>5} {k['tokens_generated']:>8} "
              f"{k['restarts']:>8}  {models}")
    return 0


def drain(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("llmos: cluster drain KERNEL|NODE")
    target = {"kernel": int(argv[0])} if argv[0].isdigit() else {"node": argv[0]}
    with _client() as c:
        r = c.cluster_drain(**target)
    print(f"drained kernel(s) {r['kernels']}: {len(r['moved'])} processes moved, {len(r['failed'])} failed")
    for f in r["failed"]:
        print(f"  pid {f['pid']}: {f['error']}")
    return 0 if not r["failed"] else 1


def add(argv: list[str]) -> int:
    with _client() as c:
        r = c.cluster_add(n=int(argv[0]) if argv else 1)
    print(f"added kernel(s) {r['kernels']}")
    return 0


def down(argv: list[str]) -> int:
    own, _ = _split([a for a in argv if a not in ("--drain", "--discard")])
    state = Path(own["--state-dir"]).expanduser() if "--state-dir" in own else locate.state_dir()
    mode = "drain" if "--drain" in argv else "discard" if "--discard" in argv else "checkpoint"
    try:
        info = json.loads((state / INFO).read_text())
    except (OSError, ValueError):
        info = {}
    try:
        with _client() as c:
            c.shutdown(mode=mode)
    except SyscallError as err:
        if err.errno != "ECONNREFUSED":
            raise
        print("llmos: no cluster front answers here", file=sys.stderr)
    pid = info.get("front_pid")
    deadline = time.monotonic() + 300
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _stop_head(info)
    (state / INFO).unlink(missing_ok=True)
    print("llmos: cluster stopped")
    return 0


def _stop_head(info: dict) -> None:
    """Stop the Ray cluster ``up`` started (never one it joined)."""
    pid = info.get("ray_head_pid")
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    current = Path("/tmp/ray/ray_current_cluster")     # what address="auto" would find: not ours any more
    try:
        if current.read_text().strip().endswith(info.get("address", "").rpartition(":")[2]):
            current.unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
