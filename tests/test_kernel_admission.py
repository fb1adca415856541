"""Fair admission: calls queued by one caller do not delay another's by more than a turn."""
import tempfile
from pathlib import Path

from llmos.kernel.loop import Kernel, KernelConfig
from llmos.kernel.security import UserDB
from llmos.syscalls import abi, locate


def test_a_flood_of_one_users_calls_is_served_in_turn_with_another_users_call():
    state = Path(tempfile.mkdtemp(prefix="llmos-"))
    users = UserDB(state / "users.json")
    users.bootstrap()
    _, alice = users.add("alice")
    _, bob = users.add("bob")
    k = Kernel(KernelConfig(state_dir=state, socket=locate.default_socket(state), model=None), users)
    try:
        for i in range(500):
            k.accept(b"alice", [abi.encode_request(i, "nop", {}, alice)])
        k.accept(b"bob", [abi.encode_request("b", "nop", {}, bob)])
        assert k.serve_queued(2) == 2                   # one call of each caller per round
        assert [identity for identity, _ in k.outbox.frames] == [b"alice", b"bob"]
        assert [abi.decode_reply(f)["id"] for _, f in k.outbox.frames] == [0, "b"]
        k.outbox.frames.clear()
        assert k.serve_queued(1000) == 499              # alice's, still in her order
        assert [abi.decode_reply(f)["id"] for _, f in k.outbox.frames] == list(range(1, 500))
    finally:
        k.io.stop()
