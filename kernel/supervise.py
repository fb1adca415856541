"""The kernel's supervisor: ``python -m llmos.kernel.supervise [--module M] [options]``.

``--module llmos.cluster`` supervises a cluster's front the same way (``llmos cluster up``): a
front that crashed is started again and adopts the running kernels and its saved pids.

``llmos kernel start`` runs the kernel under this small process rather than a systemd unit:
it works the same with and without systemd (containers, laptops, CI), needs no root and no
unit files, and tests can exercise it. It starts the kernel; when the kernel dies of a crash (a
signal, or a non-zero exit after it had come up) it starts it again after a backoff (1 s,
doubling to 30 s, back to 1 s once a kernel has run a minute), and the new kernel restores
every process from the journal. A clean stop (exit 0: ``shutdown``, SIGTERM) ends the
supervisor too; SIGTERM/SIGINT to the supervisor are passed to the kernel. A kernel that never
came up (it did not print "kernel ready": a bad option, a second kernel, a model that cannot be
served) is not retried: its exit code is the supervisor's, and ``kernel start`` reports it.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("llmos.supervise")
BACKOFF_S, MAX_BACKOFF_S, STEADY_S = 1.0, 30.0, 60.0
READY = {"llmos.kernel": "kernel ready",              # what each prints once it serves
         "llmos.cluster": "cluster front ready"}


def main(argv: list[str]) -> int:
    module = "llmos.kernel"
    if argv[:1] == ["--module"] and len(argv) > 1 and argv[1] in READY:
        module, argv = argv[1], argv[2:]
    logging.basicConfig(format="%(asctime)s supervise: %(message)s", level=logging.INFO, stream=sys.stdout)
    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = BACKOFF_S
    while True:
        started, ready = time.monotonic(), threading.Event()
        child = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        relay = threading.Thread(target=_relay, args=(child.stdout, ready, READY[module]), daemon=True)
        relay.start()
        rc = child.wait()
        relay.join(5)
        ran = time.monotonic() - started
        if stopping or rc == 0 or not ready.is_set():
            return rc
        if ran > STEADY_S:
            backoff = BACKOFF_S
        log.warning(f"{module} exited %s after %.0f s; restarting in %.0f s",
                    f"by signal {-rc}" if rc < 0 else f"with {rc}", ran, backoff)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.1)
        if stopping:
            return rc
        backoff = min(MAX_BACKOFF_S, backoff * 2)


def _relay(stream, ready: threading.Event, word: str) -> None:
    """Copy the child's output to ours (kernel.out), noting when it says it is ready."""
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        if word.encode() in line:
            ready.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
