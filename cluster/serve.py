"""Running the front: ``python -m llmos.cluster [options] [-- kernel options]``.

Boot connects to Ray, adopts or starts the kernel actors, waits until the head kernel (and each
other one) has joined, then serves the usual socket of ``--state-dir`` (so every local client
finds it as it would a kernel), and CURVE TCP with ``--listen``. ``llmos cluster up`` starts
this in the background. SIGTERM stops the front alone (the kernels, detached actors, keep
running and a new front adopts them); the ``shutdown`` call stops the whole cluster.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import zmq

from llmos.cluster import launch, lifecycle
from llmos.cluster.front import Front, FrontConfig
from llmos.cluster.members import MemberState
from llmos.cluster.placement import Policy
from llmos.kernel import boot
from llmos.kernel.security import make_private_dir, own_subdir
from llmos.syscalls import locate

READY = "llmos: cluster front ready"
BOOT_TIMEOUT = 600.0
PIDFILE = "front.pid"


def parse_args(argv: list[str] | None = None) -> FrontConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    kernel_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m llmos.cluster", description="Run a cluster's front.")
    p.add_argument("--state-dir", default=None, help="default $LLMOS_STATE_DIR or ~/.llmos")
    p.add_argument("--socket", default=None, help="default ipc://<state>/run/kernel.sock, as a kernel's")
    p.add_argument("--listen", default=None, metavar="tcp://HOST:PORT", help="also serve CURVE TCP")
    p.add_argument("--address", default="auto", help="the Ray cluster (auto: the one running here)")
    p.add_argument("--kernels", type=int, default=1, help="kernels to start (one per bundle)")
    p.add_argument("--per-gpu", action="store_true", help="one kernel per GPU (a GPU in each bundle)")
    p.add_argument("--kernel-cpus", type=float, default=1.0, help="CPUs each kernel declares to Ray")
    p.add_argument("--placement", choices=("prefix", "round-robin", "least-loaded"), default="prefix")
    p.add_argument("--balance-abs", type=int, default=8)
    p.add_argument("--balance-rel", type=float, default=1.5)
    p.add_argument("--max-procs-per-user", type=int, default=1024)
    a = p.parse_args(argv)
    boot.parse_args(kernel_args)                  # the kernels' options, refused here if wrong
    state = Path(a.state_dir).expanduser() if a.state_dir else locate.state_dir()
    return FrontConfig(state_dir=state, socket=a.socket or locate.default_socket(state), listen=a.listen,
                       address=a.address, num_kernels=max(1, a.kernels), per_gpu=a.per_gpu,
                       kernel_cpus=a.kernel_cpus, kernel_args=kernel_args,
                       policy=Policy(a.placement, a.balance_abs, a.balance_rel),
                       max_procs_per_user=a.max_procs_per_user)


def pump(front: Front, timeout_ms: int = 50) -> None:
    """One turn: client frames, kernels' replies, and (every ``TICK``) Ray's news."""
    members = [m for m in front.members.values() if m.sock is not None]
    socks = (front.io.sockets + front.io.monitors if front.io else []) + [m.sock for m in members]
    if socks != front.polled:                    # the poller changes only when the sockets do
        front.poller, front.polled = zmq.Poller(), socks
        for s in socks:
            front.poller.register(s, zmq.POLLIN)
    events = dict(front.poller.poll(timeout_ms))
    if front.io is not None:
        if any(s in events for s in front.io.sockets):
            for _ in range(1024):
                try:
                    frames = front.io.channel.recv_multipart()
                except zmq.Again:
                    break
                front.on_request(frames[0], frames[1:])
        for mon in front.io.monitors:
            while mon in events and mon.poll(0):
                mon.recv_multipart()
    for m in members:
        sock = m.sock
        for _ in range(4096 if sock in events else 0):
            if m.sock is not sock:
                break
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            front.on_kernel_frame(m, frame)
    now = time.monotonic()
    if now - front.last_tick >= lifecycle.TICK:
        front.last_tick = now
        try:
            lifecycle.tick(front, now)
        except Exception:                         # Ray's or our own: log it, keep serving
            logging.getLogger("llmos.cluster").error("front tick: %s", traceback.format_exc())


def run(front: Front) -> None:
    import ray
    lifecycle.boot(front)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while any(m.state not in (MemberState.UP, MemberState.GONE) for m in front.members.values()):
        if time.monotonic() > deadline or not front.running:
            raise SystemExit("llmos: the cluster's kernels did not all come up (see kernels/*/kernel.out)")
        pump(front)
    if front.members.get(0) is None or front.members[0].state is not MemberState.UP:
        raise SystemExit("llmos: the head kernel (0) did not come up")
    from llmos.cluster.frontio import FrontIO
    front.io = FrontIO(front.ctx, front.cfg.socket, front.cfg.max_frame, front.cfg.listen, front.cfg.state_dir)
    extra = f" and {front.cfg.listen} (CURVE)" if front.cfg.listen else ""
    print(f"{READY} (pid {os.getpid()}) on {front.cfg.socket}{extra}: {len(front.members)} kernels", flush=True)
    try:
        while front.running:
            pump(front)
    finally:
        close(front)


def close(front: Front) -> None:
    """After ``shutdown``: stop every kernel (its mode) and remove the actors; else leave them."""
    import ray
    if front.stop_all is not None:
        refs = [m.actor.stop.remote(front.stop_all, front.token) for m in front.members.values()
                if m.state is not MemberState.GONE]
        try:
            ray.get(refs, timeout=300)
        except Exception as exc:
            logging.getLogger("llmos.cluster").warning("stopping kernels: %s", exc)
        launch.remove({m.kernel: m.actor for m in front.members.values()})
        front.pids_file.unlink(missing_ok=True)
    elif front.pids.dirty:
        front.pids.save(front.pids_file)              # the next front adopts the kernels and these
    for m in front.members.values():
        m.close()
    if front.io is not None:
        front.io.stop()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    boot.check_endpoint(cfg.socket, cfg.listen)
    try:
        make_private_dir(cfg.state_dir, "the state directory", f"--state-dir {own_subdir(cfg.state_dir)}")
    except OSError as err:
        raise SystemExit(f"llmos: {err}")
    boot.prepare_socket_dir(cfg.socket)
    if boot._socket_answers(cfg.socket):
        raise SystemExit(f"llmos: a kernel or front already serves {cfg.socket}")
    pidfile = cfg.state_dir / PIDFILE
    pidfile.write_text(f"{os.getpid()}\n{cfg.socket}\n")
    handler = logging.FileHandler(cfg.state_dir / "front.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("llmos").addHandler(handler)
    logging.getLogger("llmos").setLevel(logging.INFO)
    front = Front(cfg)
    stop = lambda signum, frame: setattr(front, "running", False)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run(front)
    finally:
        if pidfile.exists() and pidfile.read_text().split()[0] == str(os.getpid()):
            pidfile.unlink()
    return 0
