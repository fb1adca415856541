"""A third-party llmos service: echo, a stream, and ways to fail (for supervision tests)."""
import os
import time

from llmos.services.base import Service
from llmos.syscalls.table import Arg, Syscall


class EchoService(Service):
    name = "echo"
    calls = (
        Syscall(0, "echo", (Arg("text", "str", required=True, max_len=1000),), cap="fs",
                doc="Return the text and who asked."),
        Syscall(0, "echo_count", (Arg("n", "int", required=True, min=0, max=100),), stream=True,
                doc="Stream 0..n-1."),
        Syscall(0, "echo_crash", cap="fs", doc="Exit at once (the kernel restarts the service)."),
        Syscall(0, "echo_hang", cap="fs", doc="Stop answering and heartbeating."),
        Syscall(0, "echo_ls_as", (Arg("uid", "int", required=True, min=0),), cap="fs",
                doc="List uid's files through fs, as uid (needs --delegate echo)."),
        Syscall(0, "echo_slow", (Arg("seconds", "float", required=True, min=0, max=60),),
                doc="Answer after a while, on a worker thread (the service keeps serving)."),
    )
    threaded = frozenset({"echo_slow", "echo_ls_as"})

    def setup(self):
        time.sleep(float(os.environ.get("LLMOS_ECHO_SETUP_S", "0")))     # a slow start (imports, logs)

    def handlers(self):
        return {"echo": self.echo, "echo_count": self.count, "echo_crash": self.crash, "echo_hang": self.hang,
                "echo_ls_as": self.ls_as, "echo_slow": self.slow}

    def echo(self, caller, text):
        return {"text": text, "caller": caller, "pid": os.getpid()}

    def count(self, caller, n):
        yield from range(n)

    def crash(self, caller):
        os._exit(3)

    def hang(self, caller):
        time.sleep(3600)

    def ls_as(self, caller, uid):
        with self.kernel_client() as k:
            return k.call("svc_call", call="fs_list", args={}, uid=uid)

    def slow(self, caller, seconds):
        time.sleep(seconds)
        return {"slept": seconds, "caller": caller["user"]}
