"""Booting the kernel: ``python -m llmos.kernel [options]`` runs it in the foreground.

Boot prepares the state directory and the socket's directory (mode 0700; a shared directory such
as /tmp is refused, never chmodded), creates root and its token at first boot
(shown once, saved to ``<state>/token`` mode 0600 for the local user), takes the pidfile
(refusing to start twice), sets up logging to ``<state>/kernel.log``, makes SIGTERM/SIGINT
stop the loop cleanly, and runs the loop. ``llmos kernel start`` (userland) starts this module
as a background process.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import zmq

from llmos import hostmem
from llmos.kernel import audit, curve
from llmos.kernel.io import secure_ipc_dir
from llmos.kernel.loop import Kernel, KernelConfig
from llmos.kernel.security import UserDB, make_private_dir, own_subdir, write_private
from llmos.syscalls import abi, locate

PIDFILE = "kernel.pid"
DEFAULT_SERVICES = ("fs", "kg", "tuner")


def parse_args(argv: list[str] | None = None) -> KernelConfig:
    p = argparse.ArgumentParser(prog="llmos kernel start", description="Run the llmos kernel.")
    p.add_argument("--state-dir", default=None, help="default $LLMOS_STATE_DIR or ~/.llmos")
    p.add_argument("--socket", default=None, help="ZeroMQ endpoint (default ipc://<state>/run/kernel.sock); a TCP "
                   "address other than loopback means --listen on it, with the default ipc socket for local use")
    p.add_argument("--listen", default=None, metavar="tcp://HOST:PORT",
                   help="also serve the ABI over CURVE-encrypted TCP, for other machines (llmos kernel key "
                        "prints the public key clients need)")
    p.add_argument("--model", default="default",
                   help="model path or hub id; 'default' = built-in tiny random model; 'none' = no model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--attention-backend", choices=("auto", "torch", "triton"), default="auto",
                   help="paged attention kernels: torch reference, Triton, or auto (Triton on CUDA)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--kv-blocks", type=int, default=None, help="device KV blocks (default: a fraction of free memory)")
    p.add_argument("--kv-fraction", type=float, default=0.5, help="fraction of free device memory for KV")
    p.add_argument("--host-kv-blocks", type=int, default=None, help="host swap blocks (default: = device blocks)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--adapter-slots", type=int, default=4, help="LoRA adapters on the device at once, per model")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--preempt-mode", choices=("auto", "swap", "recompute"), default="auto")
    p.add_argument("--max-frame", type=int, default=abi.MAX_FRAME_BYTES, help="largest accepted frame in bytes")
    p.add_argument("--rate-limit", type=float, default=0.0, help="calls per second per user (0 = unlimited)")
    p.add_argument("--max-procs-per-user", type=int, default=1024)
    p.add_argument("--kv-quota-blocks", type=int, default=None,
                   help="KV blocks per non-root user, in all (a block its processes share counts once)")
    p.add_argument("--no-fair-share", action="store_true",
                   help="serve users by arrival instead of weighted fair queueing (for comparison)")
    p.add_argument("--device-budget", type=int, default=None,
                   help="device bytes for weights + KV + adapters (default 90%% of free memory)")
    p.add_argument("--host-budget", type=int, default=None,
                   help="host bytes for offloaded weights (default 50%% of available RAM)")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=PATH",
                   help="a model name users can spawn by (repeatable)")
    p.add_argument("--service", action="append", default=None, metavar="NAME",
                   help="start this service at boot (repeatable): built-in or an llmos.services plug-in; "
                        "default: fs, kg and tuner")
    p.add_argument("--no-services", action="store_true", help="start no services at boot")
    p.add_argument("--delegate", action="append", default=[], metavar="NAME",
                   help="let plug-in service NAME make calls on behalf of users (svc_call); built-ins may")
    p.add_argument("--service-call-timeout", type=float, default=60.0,
                   help="seconds a service may take to answer a call (ETIMEDOUT after)")
    p.add_argument("--alert", action="append", default=[], metavar="NAME=VALUE",
                   help="alert threshold (repeatable; 0 = off): kv_usage (fraction, default 0.95), queue_wait_s "
                        "(30), swap_rate (swaps/s, 5), service_down (1)")
    p.add_argument("--no-journal", action="store_true",
                   help="keep no process journal: processes do not survive a crash or a stop")
    p.add_argument("--journal-interval", type=float, default=0.05, metavar="SECONDS",
                   help="group commit interval of the process journal (0: at every loop turn); a crash "
                        "loses at most this much of unacknowledged progress, which is regenerated")
    p.add_argument("--session-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="a client session not heard from this long has ended: its interactive and hup=True "
                        "processes get HUP (end and are reaped)")
    p.add_argument("--zombie-ttl", type=float, default=3600.0, metavar="SECONDS",
                   help="an ended process nobody waits for is reaped this long after it ended")
    p.add_argument("--trusted-key", action="append", default=[], metavar="Z85",
                   help="a CURVE client key that checks users' registered keys itself (a cluster's front, "
                        "llmos cluster): its connections may speak for any user whose token they carry")
    p.add_argument("--foreground", action="store_true", help="accepted for symmetry; this module always runs in the foreground")
    a = p.parse_args(argv)
    state = Path(a.state_dir).expanduser() if a.state_dir else locate.state_dir()
    if a.socket and a.socket.startswith("tcp://") and not locate.is_loopback(a.socket):
        if a.listen:
            raise SystemExit("llmos: give a non-loopback TCP address as --listen, not also as --socket")
        a.socket, a.listen = None, a.socket
    return KernelConfig(
        state_dir=state, socket=a.socket or locate.default_socket(state), listen=a.listen,
        model=None if a.model.lower() == "none" else a.model, device=a.device, dtype=a.dtype,
        attention_backend=a.attention_backend,
        kv_blocks=a.kv_blocks, kv_fraction=a.kv_fraction, host_kv_blocks=a.host_kv_blocks,
        block_size=a.block_size, adapter_slots=a.adapter_slots, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_batched_tokens, preempt_mode=a.preempt_mode,
        max_frame=a.max_frame, rate_limit=a.rate_limit, max_procs_per_user=a.max_procs_per_user,
        kv_quota_blocks=a.kv_quota_blocks, fair_share=not a.no_fair_share, device_budget=a.device_budget, host_budget=a.host_budget,
        aliases=dict(_alias(x) for x in a.alias), alerts=dict(_alert(x) for x in a.alert),
        service_call_timeout=a.service_call_timeout, delegates=list(a.delegate),
        journal=not a.no_journal, journal_interval=max(0.0, a.journal_interval),
        session_timeout=max(0.5, a.session_timeout), zombie_ttl=max(0.0, a.zombie_ttl),
        trusted_keys=list(a.trusted_key),
        services=[] if a.no_services else (a.service if a.service is not None else list(DEFAULT_SERVICES)))


def _alias(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"llmos: --alias wants NAME=PATH, got {text!r}")
    return name, path


def _alert(text: str) -> tuple[str, float]:
    from llmos.kernel.alerts import RULES
    name, sep, value = text.partition("=")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not sep or name not in RULES or not threshold >= 0:
        raise SystemExit(f"llmos: --alert wants NAME=VALUE with NAME in {sorted(RULES)} and VALUE >= 0, got {text!r}")
    return name, threshold


def check_endpoint(endpoint: str, listen: str | None = None) -> None:
    """The local socket is ipc or loopback TCP (no encryption: tokens must not cross a network in
    clear); other machines reach the kernel over CURVE (``listen``), on any TCP address."""
    if endpoint.startswith("tcp://"):
        if not locate.is_loopback(endpoint):
            raise SystemExit(f"llmos: refusing to serve {endpoint} in clear: use --listen for CURVE")
    elif not locate.is_ipc(endpoint):
        raise SystemExit(f"llmos: unsupported endpoint {endpoint}; use ipc://PATH or tcp://127.0.0.1:PORT")
    if listen is not None and (not listen.startswith("tcp://") or ":" not in listen[len("tcp://"):]):
        raise SystemExit(f"llmos: --listen wants tcp://HOST:PORT, got {listen}")


def prepare_state_dir(state: Path) -> UserDB:
    """Create the state directory and the user table; at first boot make root's token."""
    try:
        make_private_dir(state, "the state directory", f"--state-dir {own_subdir(state)}")
    except OSError as err:
        raise SystemExit(f"llmos: {err}")
    users = UserDB(state / "users.json")
    token = users.bootstrap()
    if token is not None:
        write_private(state / locate.TOKEN_NAME, token + "\n")
        print(f"llmos: first boot; root token (shown once, saved to {state / locate.TOKEN_NAME}):\n{token}",
              flush=True)
    return users


def prepare_socket_dir(endpoint: str) -> None:
    """An ipc socket's directory: mode 0700, and never a shared one."""
    if locate.is_ipc(endpoint):
        try:
            secure_ipc_dir(Path(locate.ipc_path(endpoint)))
        except OSError as err:
            raise SystemExit(f"llmos: {err}")


def take_pidfile(state: Path, socket: str) -> Path:
    """Refuse to start when a kernel already runs on this state directory or socket."""
    pidfile = state / PIDFILE
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    if pid and pid != os.getpid() and _alive(pid):     # a zombie or a reused pid is no kernel
        raise SystemExit(f"llmos: a kernel is already running (pid {pid}, pidfile {pidfile})")
    if _socket_answers(socket):
        raise SystemExit(f"llmos: another kernel already serves {socket}")
    write_private(pidfile, f"{os.getpid()}\n{socket}\n")
    return pidfile


def _alive(pid: int) -> bool:
    return locate.kernel_alive(pid)


def _socket_answers(endpoint: str) -> bool:
    """True if something answers a nop on ``endpoint`` (any reply, even an error, counts)."""
    if locate.is_ipc(endpoint) and not os.path.exists(locate.ipc_path(endpoint)):
        return False
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send(abi.encode_request(0, "nop", {}, None))
        return bool(s.poll(500, zmq.POLLIN))
    finally:
        s.close(0)


def setup_logging(state: Path) -> None:
    handler = logging.FileHandler(state / "kernel.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llmos")
    root.setLevel(logging.INFO)
    root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    check_endpoint(cfg.socket, cfg.listen)
    hostmem.keep_large_buffers()
    users = prepare_state_dir(cfg.state_dir)
    audit.open(cfg.state_dir)
    curve.server_keys(cfg.state_dir)              # made at first boot: `llmos kernel key` prints it
    prepare_socket_dir(cfg.socket)
    pidfile = take_pidfile(cfg.state_dir, cfg.socket)
    setup_logging(cfg.state_dir)
    try:
        kernel = Kernel(cfg, users)
        stop = lambda signum, frame: setattr(kernel, "running", False)  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        remote = f" and {cfg.listen} (CURVE, key {curve.public_key(cfg.state_dir)})" if cfg.listen else ""
        print(f"llmos: kernel ready (pid {os.getpid()}) on {cfg.socket}{remote}", flush=True)
        kernel.run()
    finally:
        if pidfile.exists() and pidfile.read_text().split()[0] == str(os.getpid()):
            pidfile.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
